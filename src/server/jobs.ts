import type { Context } from "hono";
import { analysisRequest, checkAnalysisRequest } from "../requests/analysis.ts";
import { benchRequest } from "../requests/bench.ts";
import { PRESETS } from "../bench/shapes.ts";
import {
  type BenchOptions,
  type BenchReport,
  checkBenchFits,
  formatBench,
  memoryLimits,
} from "../bench/run.ts";
import { InputError, NotFoundError } from "../errors.ts";
import type { FusionPlan } from "../fusion/plan.ts";
import type { AnalysisWithFrontier } from "../fusion/frontier.ts";
import type { AnalysisJob } from "../requests/analysis.ts";
import { heatmapSvg } from "../fusion/heatmap.ts";
import { frontierChartSvg } from "./frontier_chart.ts";
import { BackgroundJob } from "../workers/background.ts";
import type { ModelHost } from "../serving/host.ts";
import { readBody } from "./body.ts";
import type { AppEnv } from "./logging.ts";

export type AnalysisRunner = BackgroundJob<AnalysisJob, AnalysisWithFrontier>;
export type BenchRunner = BackgroundJob<BenchOptions, BenchReport>;

export const analysisRunner = (): AnalysisRunner =>
  new BackgroundJob("an analysis", new URL("../workers/analysis_worker.ts", import.meta.url));

export const benchRunner = (): BenchRunner =>
  new BackgroundJob("a benchmark", new URL("../workers/bench_worker.ts", import.meta.url));

/** The served model's config and its file-backed checkpoint (a ready host always has both). */
function requireModel(host: ModelHost) {
  return { config: host.requireReady(), checkpoint: host.checkpoint! };
}

/** GET answers the job's state, progress and last result; 404 before the first one. */
function status<R>(
  job: BackgroundJob<unknown, R>,
  c: Context<AppEnv>,
  render: (r: R) => Record<string, unknown>,
) {
  if (job.status === "none") {
    throw new NotFoundError(`no ${job.noun} yet: POST runs one`);
  }
  return c.json({
    status: job.status,
    progress: job.progress,
    error: job.error,
    ...(job.last ? render(job.last) : { report: null }),
  });
}

export function analysisRoutes(job: AnalysisRunner, host: ModelHost, textPath: string, bench: BenchRunner) {
  return {
    get: (c: Context<AppEnv>) => status(job, c, (report) => ({ report })),
    heatmap: (c: Context<AppEnv>) => {
      if (!job.last) throw new NotFoundError("no analysis yet: POST /analysis runs one");
      c.header("content-type", "image/svg+xml");
      return c.body(heatmapSvg(job.last.analysis, `${job.last.model}: block dependency`));
    },
    frontier: (c: Context<AppEnv>) => {
      if (!job.last?.frontier) {
        throw new NotFoundError("no frontier yet: POST /analysis with remove_steps measures one");
      }
      c.header("content-type", "image/svg+xml");
      // x: the measured speed-up once a benchmark has decoded frontier plans, unless ?x=steps.
      const speedups = c.req.query("x") === "steps" ? new Map() : measuredSpeedups(bench);
      return c.body(frontierChartSvg(job.last.frontier, host.instance?.planId ?? null, speedups));
    },
    post: async (c: Context<AppEnv>) => {
      const req = await readBody(c, analysisRequest);
      const { config, checkpoint } = requireModel(host);
      checkAnalysisRequest(req, config);
      job.start({
        checkpoint,
        modelDir: host.modelDir,
        textPath,
        slice: { skip: req.skip_tokens, max: req.max_tokens, window: req.window },
        suggest: { maxWidth: req.max_width, threshold: req.threshold },
        frontier: req.remove_steps > 0
          ? {
            steps: req.remove_steps,
            maxLossIncrease: req.max_loss_increase,
            maxWidth: req.max_width,
            device: host.device ?? "wasm",
          }
          : undefined,
      });
      return c.json({ status: "running" }, 202);
    },
    delete: (c: Context<AppEnv>) => {
      job.cancel();
      return c.json({ status: "cancelled" });
    },
  };
}

/** Each budget's best plan of the last analysis: what `frontier: true` decodes. */
function frontierPlans(analysis: AnalysisRunner): FusionPlan[] {
  const f = analysis.last?.frontier;
  if (!f) {
    throw new InputError(
      "frontier: no frontier measured yet (POST /analysis with remove_steps measures one)",
      "frontier",
    );
  }
  return f.frontier.map((p) => p.plan);
}

/**
 * Decode speed-up over the unfused model of each plan the last benchmark decoded (on the first device
 * it decoded on): the ratio of the median tokens per second.
 */
export function measuredSpeedups(bench: BenchRunner): Map<string, number> {
  const decode = bench.last?.decode ?? [];
  const device = decode[0]?.device;
  const cases = decode.filter((d) => d.device === device);
  const base = cases.find((d) => d.plan === "unfused")?.tokens_per_second.median;
  return new Map(base ? cases.map((d) => [d.plan, d.tokens_per_second.median / base]) : []);
}

export function benchRoutes(job: BenchRunner, host: ModelHost, analysis: AnalysisRunner) {
  return {
    get: (c: Context<AppEnv>) => status(job, c, (report) => ({ report, table: formatBench(report) })),
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
