import { Hono } from "hono";
import { bodyLimit } from "hono/body-limit";
import type { ModelHost } from "../runtime/host.ts";
import { getFuseHandler, postFuseHandler } from "./admin.ts";
import { analysisRoutes, type AnalysisRunner } from "./analysis.ts";
import { benchRoutes, type BenchRunner } from "./bench.ts";
import { completionsHandler } from "./completions.ts";
import { errorResponse, onError } from "./errors.ts";

export interface AppOptions {
  /** Largest accepted request body in bytes. */
  maxBodyBytes: number;
}

export interface Services {
  host: ModelHost;
  analysis: AnalysisRunner;
  bench: BenchRunner;
}

export function createApp({ host, analysis, bench }: Services, opts: AppOptions): Hono {
  const app = new Hono();
  app.onError(onError);
  app.notFound((c) => errorResponse(c, 404, `no route ${c.req.method} ${c.req.path}`));
  app.use(
    "*",
    bodyLimit({
      maxSize: opts.maxBodyBytes,
      onError: (c) => errorResponse(c, 413, `request body exceeds ${opts.maxBodyBytes} bytes`),
    }),
  );

  app.get("/health", (c) => {
    if (host.state === "loading") return c.json({ status: "loading" }, 503);
    if (host.state === "failed") return c.json({ status: "failed", error: host.error }, 503);
    const inst = host.instance!;
    return c.json({ status: "ok", model: host.assets!.name, device: inst.device, plan: inst.planId });
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

  app.post("/v1/completions", completionsHandler(host));
  app.get("/fuse", getFuseHandler(host));
  app.post("/fuse", postFuseHandler(host));
  const analyses = analysisRoutes(analysis);
  app.get("/analysis", analyses.get);
  app.get("/analysis/heatmap.svg", analyses.heatmap);
  app.post("/analysis", analyses.post);
  const benches = benchRoutes(bench);
  app.get("/bench", benches.get);
  app.post("/bench", benches.post);
  return app;
}
