import type { Context } from "hono";
import { benchRequest } from "../requests/bench.ts";
import { PRESETS } from "../bench/shapes.ts";
import { checkBenchFits, formatBench, memoryLimits } from "../bench/run.ts";
import type { ModelHost } from "../serving/host.ts";
import { NotFoundError } from "../errors.ts";
import { readBody } from "./body.ts";
import { benchChartSvg, decodeChartSvg } from "./bench_charts.ts";
import { type AnalysisRunner, type BenchRunner, frontierPlans, requireModel, status } from "./jobs.ts";
import type { AppEnv } from "./logging.ts";

/** POST, GET and DELETE /bench; GET /bench/ffn.svg and /bench/decode.svg, the last report as charts. */
export function benchRoutes(job: BenchRunner, host: ModelHost, analysis: AnalysisRunner) {
  return {
    get: (c: Context<AppEnv>) => status(job, c, (report) => ({ report, table: formatBench(report) })),
    /** The last report's FFN runs, sequential against fused, as a chart. */
    ffnChart: (c: Context<AppEnv>) => {
      if (!job.last) throw new NotFoundError("no benchmark yet: POST /bench runs one");
      c.header("content-type", "image/svg+xml");
      return c.body(benchChartSvg(job.last));
    },
    /** The last report's decode tokens/s per plan and batch size, as a chart. */
    decodeChart: (c: Context<AppEnv>) => {
      const svg = job.last && decodeChartSvg(job.last);
      if (!svg) throw new NotFoundError("no decode measured yet: POST /bench runs one");
      c.header("content-type", "image/svg+xml");
      return c.body(svg);
    },
    post: async (c: Context<AppEnv>) => {
      const req = await readBody(c, benchRequest);
      const { checkpoint } = requireModel(host);
      if (req.preset) {
        const { d, n } = PRESETS[req.preset];
        checkBenchFits(d, n, req.k, host.device!, memoryLimits());
      }
      job.start({
        model: req.preset ? undefined : host.modelDir,
        checkpoint: req.preset ? undefined : checkpoint,
        preset: req.preset,
        device: host.device!,
        k: req.k,
        tokens: req.tokens,
        dtype: req.dtype,
        decodeTokens: req.decode_tokens,
        rounds: req.rounds,
        native: req.native,
        skipWasm: req.skip_wasm,
        quantize: req.quantize,
        formats: req.formats,
        batch: req.batch,
        constrained: req.constrained,
        plans: req.frontier ? frontierPlans(analysis) : undefined,
      });
      return c.json({ status: "running" }, 202);
    },
    delete: (c: Context<AppEnv>) => {
      job.cancel();
      return c.json({ status: "cancelled" });
    },
  };
}
