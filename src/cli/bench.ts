import { z } from "zod";
import { benchRequest } from "../requests/bench.ts";
import { formatBench, runBench } from "../bench/run.ts";
import { InputError } from "../errors.ts";
import { defineCommand, deviceFlag } from "./flags.ts";

export const benchCommand = defineCommand({
  name: "bench",
  summary: "the self-benchmark: a table, or JSON with --json (progress on stderr)",
  schema: benchRequest.extend({
    model: z.string().optional().describe("benchmark this checkpoint's layers (default: a preset shape)"),
    device: deviceFlag,
    json: z.boolean().optional().describe("print the report as JSON"),
  }),
  async run(flags) {
    if (flags.model && flags.preset) throw new InputError("--model and --preset are exclusive");
    if (flags.frontier) {
      throw new InputError("only POST /bench has an analysis to take the frontier's plans from", "frontier");
    }
    const report = await runBench({
      model: flags.model,
      preset: flags.preset,
      device: flags.device,
      k: flags.k,
      tokens: flags.tokens,
      dtype: flags.dtype,
      decodeTokens: flags.decode_tokens,
      rounds: flags.rounds,
      native: flags.native,
      skipWasm: flags.skip_wasm,
      quantize: flags.quantize,
      formats: flags.formats,
      batch: flags.batch,
      constrained: flags.constrained,
    }, (line) => console.error(`bench: ${line}`));
    console.log(flags.json ? JSON.stringify(report) : formatBench(report));
  },
});
