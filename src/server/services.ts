import type { ModelHost } from "../serving/host.ts";
import type { Scheduler } from "../serving/scheduler.ts";
import type { ExportRunner } from "./export.ts";
import type { AnalysisRunner, BenchRunner } from "./jobs.ts";
import type { Metrics } from "./metrics.ts";

/** What the routes read and drive; `lifecycle.draining` is set by shutdown. */
export interface Services {
  host: ModelHost;
  scheduler: Scheduler;
  metrics: Metrics;
  analysis: AnalysisRunner;
  bench: BenchRunner;
  exports: ExportRunner;
  lifecycle: { draining: boolean };
}
