import type { Context, Next } from "hono";
import type { Metrics } from "./metrics.ts";
import type { KnownRoute } from "./routes.ts";

/** The context variables every handler may use (Hono's typed `c.get`). */
/** What a request's body may be: its size, and when it must have arrived by. */
export interface BodyLimits {
  maxBytes: number;
  timeoutMs: number;
  /** performance.now() when the headers were in. */
  since: number;
}

/** The app's typed context variables: the request's log line and its body limits. */
export type AppEnv = { Variables: { log: RequestLog; body: BodyLimits } };

const METHODS = new Set(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]);

/** Metric labels come from fixed sets: a client's made-up method or path never becomes a series. */
export function methodLabel(method: string): string {
  return METHODS.has(method) ? method : "OTHER";
}

/**
 * One JSON line per request on stdout, counted in the metrics when it is written. Handlers add
 * fields; a streaming handler defers the line to the end of its stream, so the line (and the
 * counted status, 499 for a client that left) carries the whole request.
 */
export class RequestLog {
  private readonly fields: Record<string, unknown>;
  private deferred = false;
  private emitted = false;
  private readonly start = performance.now();

  constructor(
    method: string,
    path: string,
    private readonly route: string,
    private readonly sink: (line: string) => void,
    private readonly metrics: Metrics,
  ) {
    this.fields = {
      event: "request",
      time: new Date().toISOString(),
      method: methodLabel(method),
      path: route,
    };
    if (route !== path) this.fields.path = path.slice(0, 200);
  }

  set(fields: Record<string, unknown>): void {
    Object.assign(this.fields, fields);
  }

  defer(): void {
    this.deferred = true;
  }

  get isDeferred(): boolean {
    return this.deferred;
  }

  emit(): void {
    if (this.emitted) return;
    this.emitted = true;
    this.fields.ms = Math.round(performance.now() - this.start);
    this.metrics.requests.inc({
      route: this.route,
      method: String(this.fields.method),
      status: String(this.fields.status),
    });
    this.sink(JSON.stringify(this.fields));
  }
}

/** Logs and counts every request, by route: unknown paths share one label, so clients cannot grow it. */
export function requestLogging(metrics: Metrics, routes: () => KnownRoute[], sink: (line: string) => void) {
  return async (c: Context<AppEnv>, next: Next) => {
    // A parameterised route's label is its pattern, never the id a client sent.
    const route = routes().find((r) => r.match.test(c.req.path))?.path ?? "unmatched";
    const log = new RequestLog(c.req.method, c.req.path, route, sink, metrics);
    c.set("log", log);
    await next();
    if (!log.isDeferred) {
      log.set({ status: c.res.status });
      log.emit();
    }
  };
}
