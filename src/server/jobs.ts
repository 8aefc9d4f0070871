/** What the background-job routes (/analysis, /bench) share: the runners, GET's status, the reports they read of each other. */
import type { Context } from "hono";
import type { BenchOptions, BenchReport } from "../bench/run.ts";
import { InputError, NotFoundError } from "../errors.ts";
import type { FusionPlan } from "../fusion/plan.ts";
import type { AnalysisWithFrontier } from "../fusion/frontier.ts";
import type { AnalysisJob } from "../requests/analysis.ts";
import { BackgroundJob } from "../workers/background.ts";
import type { ModelHost } from "../serving/host.ts";
import type { AppEnv } from "./logging.ts";

export type AnalysisRunner = BackgroundJob<AnalysisJob, AnalysisWithFrontier>;
export type BenchRunner = BackgroundJob<BenchOptions, BenchReport>;

export const analysisRunner = (): AnalysisRunner =>
  new BackgroundJob("an analysis", new URL("../workers/analysis_worker.ts", import.meta.url));

export const benchRunner = (): BenchRunner =>
  new BackgroundJob("a benchmark", new URL("../workers/bench_worker.ts", import.meta.url));

/** The served model's config and its file-backed checkpoint (a ready host always has both). */
export function requireModel(host: ModelHost) {
  return { config: host.requireReady(), checkpoint: host.checkpoint! };
}

/** GET answers a job's state, progress and last result; 404 before the first one. */
export function status<R>(
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

/** Each budget's best plan of the last analysis: what `frontier: true` decodes. */
export function frontierPlans(analysis: AnalysisRunner): FusionPlan[] {
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
