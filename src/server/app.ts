import { Hono } from "hono";
import { UnavailableError } from "../errors.ts";
import { cors } from "hono/cors";
import { getFuseHandler, postFuseHandler } from "./fuse.ts";
import { chatEndpoint } from "./chat.ts";
import { type CompletionLimits, completionRoute } from "./completion_route.ts";
import { completionsEndpoint } from "./completions.ts";
import { exportRoute } from "./export.ts";
import { dashboardHandler } from "./dashboard.ts";
import { onError } from "./errors.ts";
import { methodNotAllowed } from "./methods.ts";
import { knownRoutes } from "./routes.ts";
import { statusRoutes } from "./status.ts";
import { perClientLimit } from "./client_limits.ts";
import { bodyLimits } from "./body.ts";
import { checkHost, requireBearer, requireJson, sameSiteOnly } from "./guards.ts";
import { modelRoutes } from "./models.ts";
import { tokenRoutes } from "./tokens.ts";
import { analysisRoutes } from "./analysis.ts";
import { benchRoutes } from "./bench.ts";
import { type AppEnv, requestLogging } from "./logging.ts";
import type { Services } from "./services.ts";

export interface AppOptions extends CompletionLimits {
  /** Largest accepted request body in bytes. */
  maxBodyBytes: number;
  /** How long a request's body may take to arrive after its headers (then 408). */
  bodyTimeoutMs: number;
  /** Requests one client address may have in flight (then 429). */
  maxClientRequests: number;
  /** Bearer token for /fuse, /bench and /analysis writes; open when unset. */
  adminToken?: string;
  /** Bearer token for /v1/*; open when unset. */
  apiKey?: string;
  /** Host header names served; null serves any (see guards.ts). */
  allowedHosts: Set<string> | null;
  /** Origins allowed to call from a browser (CORS and the cross-site check); none by default. */
  corsOrigins: string[];
  /** Calibration text for POST /analysis. */
  textPath: string;
  /** Where the one-line-per-request log goes. */
  log: (line: string) => void;
}

export function createApp(services: Services, opts: AppOptions): Hono<AppEnv> {
  const { host, scheduler, metrics, analysis, bench, lifecycle } = services;
  const app = new Hono<AppEnv>();
  const routes = knownRoutes(app);
  app.onError(onError);
  app.notFound(methodNotAllowed(routes));
  app.use("*", requestLogging(metrics, routes, opts.log));
  app.use("*", checkHost(opts.allowedHosts));
  if (opts.corsOrigins.length) app.use("*", cors({ origin: opts.corsOrigins, maxAge: 600 }));
  app.use("*", perClientLimit(opts.maxClientRequests));
  app.use("*", bodyLimits(opts.maxBodyBytes, opts.bodyTimeoutMs));
  // Every state-changing route: never from another site's page, JSON bodies only.
  const sameSite = sameSiteOnly(opts.corsOrigins);
  const admin = requireBearer(opts.adminToken, "this admin route");
  const notDraining = async (_c: unknown, next: () => Promise<void>) => {
    if (lifecycle.draining) throw new UnavailableError("the service is shutting down and takes no new work");
    await next();
  };
  const apiKey = requireBearer(opts.apiKey, "the API");
  app.use("/v1/*", apiKey);

  const status = statusRoutes(services);
  app.get("/health", status.health);
  app.get("/stats", status.stats);
  app.get("/metrics", status.metrics);

  const models = modelRoutes(host);
  app.get("/v1/models", models.list);
  app.get("/v1/models/:id", models.model);
  const tokens = tokenRoutes(host);
  app.post("/tokenize", apiKey, sameSite, requireJson, tokens.tokenize);
  app.post("/detokenize", apiKey, sameSite, requireJson, tokens.detokenize);

  const generation = { host, scheduler, metrics, limits: opts, modelName: () => host.name };
  app.post(
    "/v1/completions",
    sameSite,
    requireJson,
    notDraining,
    completionRoute(completionsEndpoint, generation),
  );
  app.post(
    "/v1/chat/completions",
    sameSite,
    requireJson,
    notDraining,
    completionRoute(chatEndpoint, generation),
  );
  app.get("/fuse", getFuseHandler(host));
  app.post("/fuse", sameSite, admin, requireJson, notDraining, postFuseHandler(host, metrics));
  const analyses = analysisRoutes(analysis, host, opts.textPath, bench);
  app.get("/analysis", analyses.get);
  app.get("/analysis/heatmap.svg", analyses.heatmap);
  app.get("/analysis/frontier.svg", analyses.frontier);
  app.post("/analysis", sameSite, admin, requireJson, notDraining, analyses.post);
  app.delete("/analysis", sameSite, admin, analyses.delete);
  const benches = benchRoutes(bench, host, analysis);
  app.get("/bench", benches.get);
  app.get("/bench/ffn.svg", benches.ffnChart);
  app.get("/bench/decode.svg", benches.decodeChart);
  app.post("/bench", sameSite, admin, requireJson, notDraining, benches.post);
  app.delete("/bench", sameSite, admin, benches.delete);
  app.get("/export", sameSite, admin, notDraining, exportRoute(services.exports, host));
  app.get("/", dashboardHandler(services));
  return app;
}
