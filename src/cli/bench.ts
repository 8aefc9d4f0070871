import { z } from "zod";
import { formatBench, runBench } from "../bench/run.ts";
import { PRESETS } from "../bench/shapes.ts";
import { InputError } from "../errors.ts";
import { deviceFlag, int, parseFlags, validateFlags } from "./args.ts";

export const tokenList = z.string().regex(/^\d+(,\d+)*$/, "must be a comma-separated list of token counts")
  .transform((s) => s.split(",").map(Number)).refine(
    (l) => l.every((t) => t >= 1 && t <= 512),
    "token counts must be 1..512",
  );

const schema = z.strictObject({
  model: z.string().optional(),
  preset: z.enum(Object.keys(PRESETS) as [keyof typeof PRESETS]).optional(),
  device: deviceFlag,
  k: int().min(2).max(16).default(4),
  tokens: tokenList.default([1, 8, 32, 128]),
  dtype: z.enum(["f16", "f32"]).optional(),
  "decode-tokens": int().min(2).max(1000).default(64),
  json: z.boolean().optional(),
});

/** `bench`: JSON on stdout with --json, otherwise a readable table; progress on stderr. */
export async function benchCommand(argv: string[]): Promise<void> {
  const flags = validateFlags(schema, parseFlags(argv));
  if (flags.model && flags.preset) throw new InputError("--model and --preset are exclusive");
  const report = await runBench({
    model: flags.model,
    preset: flags.preset,
    device: flags.device,
    k: flags.k,
    tokens: flags.tokens,
    weightType: flags.dtype,
    decodeTokens: flags["decode-tokens"],
  }, (line) => console.error(`bench: ${line}`));
  console.log(flags.json ? JSON.stringify(report) : formatBench(report));
}
