import type { Context } from "hono";
import { z } from "zod";
import { type BenchReport, formatBench, runBench } from "../bench/run.ts";
import { PRESETS } from "../bench/shapes.ts";
import { InputError } from "../errors.ts";
import type { Device } from "../runtime/ort.ts";
import { readBody } from "./errors.ts";

export const benchRequestSchema = z.strictObject({
  /** A preset shape instead of the served model's own FFN layers. */
  preset: z.enum(Object.keys(PRESETS) as [keyof typeof PRESETS]).optional(),
  k: z.number().int().min(2).max(16).default(4),
  tokens: z.array(z.number().int().min(1).max(512)).min(1).max(8).default([1, 8, 32, 128]),
  dtype: z.enum(["f16", "f32"]).optional(),
  decode_tokens: z.number().int().min(2).max(1000).default(64),
});

/** One benchmark at a time on the serving machine; the last report stays available. */
export class BenchRunner {
  last: BenchReport | null = null;
  private running = false;

  constructor(private readonly modelDir: () => string | null, private readonly device: () => Device | null) {}

  async run(req: z.infer<typeof benchRequestSchema>): Promise<BenchReport> {
    const model = this.modelDir();
    const device = this.device();
    if (!model || !device) throw new InputError("model is not loaded yet", 409);
    if (this.running) throw new InputError("a benchmark is already running", 409);
    this.running = true;
    try {
      this.last = await runBench({
        model: req.preset ? undefined : model,
        preset: req.preset,
        device,
        k: req.k,
        tokens: req.tokens,
        weightType: req.dtype,
        decodeTokens: req.decode_tokens,
      });
      return this.last;
    } finally {
      this.running = false;
    }
  }
}

export function benchRoutes(runner: BenchRunner) {
  return {
    get: (c: Context) =>
      runner.last ? c.json({ report: runner.last, table: formatBench(runner.last) }) : c.json({
        error: {
          message: "no benchmark yet: POST /bench runs one",
          type: "invalid_request_error",
          code: null,
        },
      }, 404),
    post: async (c: Context) => {
      const report = await runner.run(await readBody(c, benchRequestSchema));
      return c.json({ report, table: formatBench(report) });
    },
  };
}
