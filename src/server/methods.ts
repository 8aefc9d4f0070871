import type { Context } from "hono";
import { errorResponse } from "./errors.ts";
import type { AppEnv } from "./logging.ts";
import type { KnownRoute } from "./routes.ts";

/**
 * What answers a path no route takes with this method: 404 for a path the app does not have;
 * for one it has, `Allow` with its methods and 405 (RFC 9110), or 204 to OPTIONS. A CORS preflight
 * from an allowed origin is answered before this by the CORS middleware; from any other origin it
 * gets no CORS headers here, so the browser refuses the call.
 */
export function methodNotAllowed(routes: () => KnownRoute[]) {
  return (c: Context<AppEnv>) => {
    const methods = [...new Set(routes().filter((r) => r.match.test(c.req.path)).map((r) => r.method))];
    if (methods.length === 0) {
      return errorResponse(c, 404, `no route ${c.req.method} ${c.req.path.slice(0, 200)}`);
    }
    if (methods.includes("GET")) methods.push("HEAD");
    const allow = [...methods, "OPTIONS"].join(", ");
    c.header("allow", allow);
    if (c.req.method === "OPTIONS") return c.body(null, 204);
    return errorResponse(c, 405, `${c.req.method} is not allowed on ${c.req.path}; use ${allow}`);
  };
}
