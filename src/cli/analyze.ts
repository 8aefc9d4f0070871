import { z } from "zod";
import { analyzeModel, DEFAULT_SUGGEST } from "../fusion/analyze.ts";
import { heatmapSvg } from "../fusion/heatmap.ts";
import { unfusedBlocks } from "../model/blocks.ts";
import { loadCheckpoint } from "../model/checkpoint.ts";
import { TextTokenizer } from "../model/tokenizer.ts";
import { int, num, parseFlags, validateFlags } from "./args.ts";
import { DEFAULT_MODEL_DIR } from "./defaults.ts";
import { textWindows } from "../fusion/calibration.ts";
import { progressPrinter } from "./progress.ts";

export const textFlags = {
  text: z.string({ error: "is required (a text file for calibration/evaluation)" }),
  "max-tokens": int().min(2).default(256),
  "skip-tokens": int().min(0).default(0),
  window: int().min(2).optional(),
};

const schema = z.strictObject({
  model: z.string().default(DEFAULT_MODEL_DIR),
  ...textFlags,
  "max-width": int().min(2).default(DEFAULT_SUGGEST.maxWidth),
  threshold: num().min(0).max(2).default(DEFAULT_SUGGEST.threshold),
  svg: z.string().optional(),
});

/**
 * `analyze`: the dependency matrix and per-block ratios on calibration text (float64 reference on
 * the CPU), and a suggested plan whose groups were checked against the measured loss.
 */
export async function analyzeCommand(argv: string[]): Promise<void> {
  const flags = validateFlags(schema, parseFlags(argv));
  const ckpt = await loadCheckpoint(flags.model);
  const tokenizer = await TextTokenizer.load(flags.model);
  const window = Math.min(flags.window ?? 256, ckpt.config.maxPositions);
  const sequences = await textWindows(flags.text, tokenizer, {
    skip: flags["skip-tokens"],
    max: flags["max-tokens"],
    window,
  });
  const report = await analyzeModel(
    ckpt,
    unfusedBlocks(ckpt),
    sequences,
    { maxWidth: flags["max-width"], threshold: flags.threshold },
    progressPrinter("analyze: forward passes"),
  );
  if (flags.svg) {
    await Deno.writeTextFile(flags.svg, heatmapSvg(report.analysis, `${report.model}: block dependency`));
  }
  console.log(JSON.stringify(report));
}
