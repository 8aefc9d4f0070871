import type { Context } from "hono";
import { z } from "zod";
import { InputError } from "../errors.ts";
import { type AnalysisReport, DEFAULT_SUGGEST } from "../fusion/analyze.ts";
import type { AnalysisJob, AnalysisMessage } from "../fusion/analysis_worker.ts";
import { heatmapSvg } from "../fusion/heatmap.ts";
import { readBody } from "./errors.ts";

export const analysisRequestSchema = z.strictObject({
  max_tokens: z.number().int().min(2).max(16384).default(256),
  skip_tokens: z.number().int().min(0).default(0),
  window: z.number().int().min(2).max(8192).default(256),
  max_width: z.number().int().min(2).max(64).default(DEFAULT_SUGGEST.maxWidth),
  threshold: z.number().min(0).max(2).default(DEFAULT_SUGGEST.threshold),
});

/** Runs analyses one at a time in a worker and keeps the last result for GET /analysis. */
export class AnalysisRunner {
  last: AnalysisReport | null = null;
  progress: { done: number; total: number } | null = null;
  error: string | null = null;
  private worker: Worker | null = null;

  constructor(private readonly modelDir: () => string | null, private readonly textPath: string) {}

  get running(): boolean {
    return this.worker !== null;
  }

  start(req: z.infer<typeof analysisRequestSchema>): void {
    const modelDir = this.modelDir();
    if (!modelDir) throw new InputError("model is not loaded yet", 409);
    if (this.worker) throw new InputError("an analysis is already running", 409);
    const worker = new Worker(new URL("../fusion/analysis_worker.ts", import.meta.url).href, {
      type: "module",
    });
    this.worker = worker;
    this.progress = { done: 0, total: 1 };
    this.error = null;
    worker.onmessage = (e: MessageEvent<AnalysisMessage>) => {
      const m = e.data;
      if (m.type === "progress") this.progress = { done: m.done, total: m.total };
      else {
        if (m.type === "done") this.last = m.report as AnalysisReport;
        else this.error = m.message;
        worker.terminate();
        this.worker = null;
      }
    };
    worker.onerror = (e) => {
      e.preventDefault();
      this.error = e.message;
      worker.terminate();
      this.worker = null;
    };
    const job: AnalysisJob = {
      modelDir,
      textPath: this.textPath,
      slice: { skip: req.skip_tokens, max: req.max_tokens, window: req.window },
      suggest: { maxWidth: req.max_width, threshold: req.threshold },
    };
    worker.postMessage(job);
  }

  stop(): void {
    this.worker?.terminate();
    this.worker = null;
  }
}

export function analysisRoutes(runner: AnalysisRunner) {
  return {
    get: (c: Context) => {
      const status = runner.running ? "running" : runner.error ? "failed" : runner.last ? "done" : "none";
      if (!runner.last && status !== "running") {
        const msg = runner.error
          ? `last analysis failed: ${runner.error}`
          : "no analysis yet: POST /analysis runs one";
        return c.json({ status, error: { message: msg, type: "invalid_request_error", code: null } }, 404);
      }
      return c.json({ status, progress: runner.progress, error: runner.error, report: runner.last });
    },
    heatmap: (c: Context) => {
      if (!runner.last) {
        return c.json(
          { error: { message: "no analysis yet", type: "invalid_request_error", code: null } },
          404,
        );
      }
      c.header("content-type", "image/svg+xml");
      return c.body(heatmapSvg(runner.last.analysis, `${runner.last.model}: block dependency`));
    },
    post: async (c: Context) => {
      runner.start(await readBody(c, analysisRequestSchema));
      return c.json({ status: "running" }, 202);
    },
  };
}
