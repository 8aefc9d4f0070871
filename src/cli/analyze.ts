import { z } from "zod";
import { analysisRequest, checkAnalysisRequest } from "../requests/analysis.ts";
import { analyzeText } from "../fusion/analyze.ts";
import { heatmapSvg } from "../fusion/heatmap.ts";
import { loadCheckpoint } from "../model/checkpoint.ts";
import { TextTokenizer } from "../model/tokenizer.ts";
import { DEFAULT_CALIBRATION_TEXT, DEFAULT_MODEL_DIR } from "./defaults.ts";
import { defineCommand, deviceFlag } from "./flags.ts";
import { modelFlags } from "./load.ts";
import { resolveDevice } from "../ort/ort.ts";
import { useThreads } from "../ort/threads.ts";
import { progressPrinter } from "./progress.ts";
import { frontierFromText } from "../instance/plan_scorer.ts";
import { type AnalysisWithFrontier, blockCandidates } from "../fusion/frontier.ts";

export const textFlag = z.string().default(DEFAULT_CALIBRATION_TEXT)
  .describe("calibration/evaluation text file (default: the shipped data/eval.py.txt)");

export const analyzeCommand = defineCommand({
  name: "analyze",
  summary:
    "dependency matrix, per-block ratios and a loss-checked suggested plan (float64, progress on stderr)",
  schema: analysisRequest.extend({
    model: z.string().default(DEFAULT_MODEL_DIR).describe("checkpoint directory"),
    text: textFlag,
    svg: z.string().optional().describe("also write the heatmap here"),
    device: deviceFlag.describe(
      "where the frontier's candidate plans are scored (the analysis itself is float64)",
    ),
    threads: modelFlags.threads,
  }),
  async run(flags) {
    const device = await resolveDevice(flags.device);
    await useThreads(device, flags.threads);
    const ckpt = await loadCheckpoint(flags.model);
    checkAnalysisRequest(flags, ckpt.config);
    const tokenizer = await TextTokenizer.load(flags.model);
    const report: AnalysisWithFrontier = await analyzeText(
      ckpt,
      tokenizer,
      flags.text,
      { skip: flags.skip_tokens, max: flags.max_tokens, window: flags.window },
      { maxWidth: flags.max_width, threshold: flags.threshold },
      progressPrinter("analyze: forward passes"),
    );
    if (flags.remove_steps > 0) {
      report.frontier = await frontierFromText(
        ckpt,
        tokenizer,
        flags.text,
        { skip: flags.skip_tokens, max: flags.max_tokens },
        {
          steps: flags.remove_steps,
          maxLossIncrease: flags.max_loss_increase,
          maxWidth: flags.max_width,
          blockGroups: blockCandidates(report.analysis, flags.max_width),
          device,
        },
        progressPrinter("analyze: frontier plans"),
      );
    }
    if (flags.svg) {
      await Deno.writeTextFile(flags.svg, heatmapSvg(report.analysis, `${report.model}: block dependency`));
    }
    console.log(JSON.stringify(report));
  },
});
