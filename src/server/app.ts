import { Hono } from "hono";
import { bodyLimit } from "hono/body-limit";
import type { ModelHost } from "../runtime/host.ts";
import type { Scheduler } from "../runtime/scheduler.ts";
import { getFuseHandler, postFuseHandler } from "./admin.ts";
import { analysisRoutes, type AnalysisRunner } from "./analysis.ts";
import { requireBearer } from "./auth.ts";
import { benchRoutes, type BenchRunner } from "./bench.ts";
import { type CompletionLimits, completionsHandler } from "./completions.ts";
import { dashboardHandler } from "./dashboard.ts";
import { errorResponse, onError } from "./errors.ts";
import { requestLogging } from "./logging.ts";
import type { Metrics } from "./metrics.ts";

export interface AppOptions extends CompletionLimits {
  /** Largest accepted request body in bytes. */
  maxBodyBytes: number;
  /** Bearer token for /fuse, /bench and /analysis writes; open when unset. */
  adminToken?: string;
  /** Bearer token for /v1/*; open when unset. */
  apiKey?: string;
  /** Where the one-line-per-request log goes. */
  log: (line: string) => void;
}

export interface Services {
  host: ModelHost;
  scheduler: Scheduler;
  metrics: Metrics;
  analysis: AnalysisRunner;
  bench: BenchRunner;
}

const ROUTES = new Set([
  "/",
  "/health",
  "/metrics",
  "/v1/models",
  "/v1/completions",
  "/fuse",
  "/analysis",
  "/analysis/heatmap.svg",
  "/bench",
]);

export function createApp(services: Services, opts: AppOptions): Hono {
  const { host, scheduler, metrics, analysis, bench } = services;
  const app = new Hono();
  app.onError(onError);
  app.notFound((c) => errorResponse(c, 404, `no route ${c.req.method} ${c.req.path}`));
  app.use("*", requestLogging(metrics, ROUTES, opts.log));
  app.use(
    "*",
    bodyLimit({
      maxSize: opts.maxBodyBytes,
      onError: (c) => errorResponse(c, 413, `request body exceeds ${opts.maxBodyBytes} bytes`),
    }),
  );
  app.use("/v1/*", requireBearer(opts.apiKey, "the API"));
  const admin = requireBearer(opts.adminToken, "this admin route");

  app.get("/health", (c) => {
    if (host.draining) return c.json({ status: "draining" }, 503);
    if (host.state === "loading") return c.json({ status: "loading" }, 503);
    if (host.state === "failed") return c.json({ status: "failed", error: host.error }, 503);
    const inst = host.instance!;
    return c.json({
      status: "ok",
      model: host.assets!.name,
      device: inst.device,
      plan: inst.planId,
      active: scheduler.active,
      queued: scheduler.queued,
    });
  });

  app.get("/metrics", (c) => {
    metrics.queueDepth.set({}, scheduler.queued);
    metrics.active.set({}, scheduler.active);
    c.header("content-type", "text/plain; version=0.0.4; charset=utf-8");
    return c.body(metrics.render());
  });

  app.get("/v1/models", (c) => {
    const data = host.assets
      ? [{
        id: host.assets.name,
        object: "model",
        created: 0,
        owned_by: "fusedge",
        plan: host.instance?.planId ?? null,
      }]
      : [];
    return c.json({ object: "list", data });
  });

  app.post("/v1/completions", completionsHandler({ host, scheduler, metrics, limits: opts }));
  app.get("/fuse", getFuseHandler(host));
  app.post("/fuse", admin, postFuseHandler(host, metrics));
  const analyses = analysisRoutes(analysis);
  app.get("/analysis", analyses.get);
  app.get("/analysis/heatmap.svg", analyses.heatmap);
  app.post("/analysis", admin, analyses.post);
  const benches = benchRoutes(bench);
  app.get("/bench", benches.get);
  app.post("/bench", admin, benches.post);
  app.get("/", dashboardHandler(services));
  return app;
}
