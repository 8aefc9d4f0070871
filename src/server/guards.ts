import type { Context, Next } from "hono";
import { bearerAuth } from "hono/bearer-auth";
import { errorBody, errorResponse } from "./errors.ts";

const LOOPBACK_NAMES = ["localhost", "127.0.0.1", "::1", "[::1]"];

function isLoopback(host: string): boolean {
  return LOOPBACK_NAMES.includes(host) || host.startsWith("127.");
}

/**
 * The Host names requests may carry. A service bound to loopback answers only loopback names, so a
 * web page that rebinds its own DNS name to 127.0.0.1 cannot reach it; one bound to an address
 * answers that address; one bound to every interface answers any name unless told which.
 */
export function allowedHosts(bound: string, extra: string[]): Set<string> | null {
  const names = extra.map((h) => h.toLowerCase());
  if (bound === "0.0.0.0" || bound === "::" || bound === "[::]") return names.length ? new Set(names) : null;
  return new Set([...(isLoopback(bound) ? LOOPBACK_NAMES : [bound.toLowerCase()]), ...names]);
}

/** The hostname of a Host header (or an Origin's host): without the port, lower case. */
function hostname(value: string): string {
  const v = value.trim().toLowerCase();
  if (v.startsWith("[")) return v.slice(0, v.indexOf("]") + 1);
  return v.split(":")[0];
}

export function checkHost(allowed: Set<string> | null) {
  return async (c: Context, next: Next) => {
    if (allowed) {
      const host = c.req.header("host");
      if (!host || !allowed.has(hostname(host))) {
        return errorResponse(
          c,
          403,
          `Host "${host ?? ""}" is not served here (allowed: ${[...allowed].join(", ")}; see --allowed-host)`,
        );
      }
    }
    await next();
  };
}

/** Bodies are parsed as JSON only when they say so: a form or text/plain post from a page is refused. */
export async function requireJson(c: Context, next: Next) {
  const type = (c.req.header("content-type") ?? "").split(";")[0].trim().toLowerCase();
  if (type !== "application/json") {
    return errorResponse(c, 415, `content-type must be application/json (got "${type || "none"}")`);
  }
  await next();
}

/**
 * State-changing routes refuse cross-site browser requests (Origin of another site, or
 * Sec-Fetch-Site: cross-site) unless the origin is one given with --cors: a page the operator visits
 * must not be able to swap plans or start jobs on their machine.
 */
export function sameSiteOnly(corsOrigins: string[]) {
  const allowed = new Set(corsOrigins.map((o) => o.toLowerCase()));
  return async (c: Context, next: Next) => {
    const origin = c.req.header("origin")?.toLowerCase();
    const host = c.req.header("host")?.toLowerCase();
    const fetchSite = c.req.header("sec-fetch-site")?.toLowerCase();
    let cross = false;
    if (origin && !allowed.has(origin)) {
      try {
        cross = new URL(origin).host !== host;
      } catch {
        cross = true;
      }
    }
    if (!origin && fetchSite === "cross-site") cross = true;
    if (cross) {
      return errorResponse(c, 403, `cross-site request from origin "${origin ?? "?"}" refused (see --cors)`);
    }
    await next();
  };
}

/**
 * Hono's bearer-auth (case-insensitive scheme, timing-safe compare) with OpenAI-style bodies. A header
 * that is not `Bearer <token>` (empty, another scheme, no scheme) is 401 like a wrong token, as OpenAI
 * answers it: Hono's 400 (RFC 6750's invalid_request) tells a client its key is fine when it is not.
 */
export function requireBearer(token: string | undefined, what: string) {
  if (!token) return async (_c: Context, next: Next) => await next();
  const text = `${what} requires a valid bearer token (Authorization: Bearer ...)`;
  const message = errorBody(text, "authentication_error");
  const check = bearerAuth({
    token,
    realm: "fusedge",
    noAuthenticationHeader: { message },
    invalidAuthenticationHeader: { message },
    invalidToken: { message },
  });
  return async (c: Context, next: Next) => {
    const header = c.req.header("authorization");
    if (header !== undefined && !/^bearer +[A-Za-z0-9._~+/-]+=*$/i.test(header.trim())) {
      c.header("WWW-Authenticate", 'Bearer realm="fusedge"');
      return errorResponse(c, 401, text, "authentication_error");
    }
    return await check(c, next);
  };
}
