import type { Env, Hono } from "hono";

/** A registered route: its method, its path pattern, and what matches a request's path to it. */
export interface KnownRoute {
  method: string;
  path: string;
  match: RegExp;
}

/** A route's path as a pattern: `:name` matches one segment. */
const pattern = (path: string) =>
  new RegExp(`^${path.replace(/[.*+?^${}()|[\]\\]/g, "\\$&").replace(/:[A-Za-z_]+/g, "[^/]+")}$`);

/**
 * The app's routes (middleware left out), read at the first call: handlers ask only once a request
 * arrives, by when every route is registered, so the app's route list is written once, where the
 * routes are.
 */
export function knownRoutes<E extends Env>(app: Hono<E>): () => KnownRoute[] {
  let routes: KnownRoute[] | null = null;
  return () =>
    routes ??= app.routes
      .filter((r) => r.method !== "ALL" && !r.path.includes("*"))
      .map((r) => ({ method: r.method, path: r.path, match: pattern(r.path) }));
}
