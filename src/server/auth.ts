import type { Context, Next } from "hono";
import { errorResponse } from "./errors.ts";

/** Constant-time comparison, so the token cannot be guessed byte by byte from response times. */
function same(a: string, b: string): boolean {
  const x = new TextEncoder().encode(a);
  const y = new TextEncoder().encode(b);
  let diff = x.length ^ y.length;
  for (let i = 0; i < Math.max(x.length, y.length); i++) diff |= (x[i] ?? 0) ^ (y[i] ?? 0);
  return diff === 0;
}

/** Requires `Authorization: Bearer <token>` when a token is configured; open otherwise. */
export function requireBearer(token: string | undefined, what: string) {
  return async (c: Context, next: Next) => {
    if (token) {
      const header = c.req.header("authorization") ?? "";
      const given = header.startsWith("Bearer ") ? header.slice(7) : "";
      if (!same(given, token)) {
        c.header("www-authenticate", 'Bearer realm="fusedge"');
        return errorResponse(
          c,
          401,
          `${what} requires a valid bearer token (Authorization: Bearer ...)`,
          "authentication_error",
        );
      }
    }
    await next();
  };
}
