import type { Context, Next } from "hono";
import { errorBody } from "./errors.ts";
import type { AppEnv } from "./logging.ts";

/**
 * At most `max` requests that carry work (POST, DELETE: generations, jobs, swaps) in flight from one
 * client address; more is 429 with `Retry-After`. Reads (health checks, metrics, the dashboard) are
 * not counted, so a client at its limit can still watch the service. A request counts until its
 * response is fully sent (a stream, to its end). The address is Deno's connection info (`c.env`);
 * behind a proxy every client is the proxy, so set this from what the proxy passes on.
 */
export function perClientLimit(max: number) {
  const inFlight = new Map<string, number>();
  return async (c: Context<AppEnv>, next: Next) => {
    const info = c.env as Deno.ServeHandlerInfo<Deno.NetAddr> | undefined;
    const reads = c.req.method === "GET" || c.req.method === "HEAD" || c.req.method === "OPTIONS";
    if (reads || !info?.remoteAddr || !info.completed) return await next();
    const address = info.remoteAddr.hostname;
    const n = inFlight.get(address) ?? 0;
    if (n >= max) {
      c.header("retry-after", "1");
      return c.json(
        errorBody(`${n} requests from ${address} are in flight; at most ${max} at once`, "rate_limit_error"),
        429,
      );
    }
    inFlight.set(address, n + 1);
    info.completed.finally(() => {
      const left = (inFlight.get(address) ?? 1) - 1;
      if (left > 0) inFlight.set(address, left);
      else inFlight.delete(address);
    }).catch(() => {});
    await next();
  };
}
