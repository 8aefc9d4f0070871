import type { Context, Next } from "hono";
import type { Metrics } from "./metrics.ts";

/**
 * One JSON line per request on stdout. Handlers add fields; a streaming handler defers the line to
 * the end of its stream, so the line carries the whole request (tokens, finish reason, duration).
 */
export class RequestLog {
  private readonly fields: Record<string, unknown>;
  private deferred = false;
  private emitted = false;
  private readonly start = performance.now();

  constructor(method: string, path: string, private readonly sink: (line: string) => void) {
    this.fields = { event: "request", time: new Date().toISOString(), method, path };
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
    this.sink(JSON.stringify(this.fields));
  }
}

/** Logs and counts every request, by route: unknown paths share one label, so clients cannot grow it. */
export function requestLogging(metrics: Metrics, routes: Set<string>, sink: (line: string) => void) {
  return async (c: Context, next: Next) => {
    const log = new RequestLog(c.req.method, c.req.path, sink);
    c.set("log", log);
    await next();
    const route = routes.has(c.req.path) ? c.req.path : "unmatched";
    metrics.requests.inc({ route, method: c.req.method, status: String(c.res.status) });
    log.set({ status: c.res.status });
    if (!log.isDeferred) log.emit();
  };
}
