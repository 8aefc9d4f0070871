import type { Context } from "hono";
import { analysisRequest, checkAnalysisRequest } from "../requests/analysis.ts";
import { NotFoundError } from "../errors.ts";
import { heatmapSvg } from "../fusion/heatmap.ts";
import type { ModelHost } from "../serving/host.ts";
import { readBody } from "./body.ts";
import { frontierChartSvg } from "./frontier_chart.ts";
import { type AnalysisRunner, type BenchRunner, measuredSpeedups, requireModel, status } from "./jobs.ts";
import type { AppEnv } from "./logging.ts";

/** POST, GET and DELETE /analysis, GET /analysis/heatmap.svg and /analysis/frontier.svg. */
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
