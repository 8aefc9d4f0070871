import type { Context } from "hono";
import type { AppEnv } from "./logging.ts";
import type { Services } from "./services.ts";

/**
 * GET /health (503 while loading, failed or draining), GET /stats (the dashboard's live panel:
 * recent throughput, first-token latency, what is running) and GET /metrics (Prometheus text, the
 * gauges read at scrape time).
 */
export function statusRoutes({ host, scheduler, metrics, lifecycle }: Services) {
  return {
    health: (c: Context<AppEnv>) => {
      if (lifecycle.draining) {
        return c.json({ status: "draining", active: scheduler.active, queued: scheduler.queued }, 503);
      }
      if (host.state === "loading") return c.json({ status: "loading" }, 503);
      if (host.state === "failed") return c.json({ status: "failed", error: host.error }, 503);
      const inst = host.instance!;
      return c.json({
        status: "ok",
        model: host.name,
        device: inst.device,
        plan: inst.planId,
        dtype: inst.graph.dtype,
        quantize: inst.graph.quantize,
        weight_bytes: inst.weightBytes,
        active: scheduler.active,
        queued: scheduler.queued,
        kv_cache: {
          budget_bytes: host.kvBudgetBytes,
          reserved_bytes: scheduler.kvReservedBytes(),
          used_bytes: host.kvBytes,
          free_bytes: Math.max(0, host.kvBudgetBytes - scheduler.kvReservedBytes()),
          // What finished sequences kept for reuse may hold of it; null where slots keep them (WebGPU).
          prefix_cache_bytes: host.prefixCacheBytes,
        },
      });
    },
    stats: (c: Context<AppEnv>) =>
      c.json({ ...metrics.live.snapshot(), active: scheduler.active, queued: scheduler.queued }),
    metrics: (c: Context<AppEnv>) => {
      metrics.queueDepth.set({}, scheduler.queued);
      metrics.active.set({}, scheduler.active);
      metrics.instances.set({}, host.liveInstances);
      metrics.weightCache.set({}, host.weightCacheBytes);
      metrics.kvBudget.set({}, host.kvBudgetBytes);
      metrics.kvReserved.set({}, scheduler.kvReservedBytes());
      metrics.kvUsed.set({}, host.kvBytes);
      c.header("content-type", "text/plain; version=0.0.4; charset=utf-8");
      return c.body(metrics.render());
    },
  };
}
