import type { Context } from "hono";
import { z } from "zod";
import { parsePlan } from "../fusion/plan.ts";
import type { ModelHost } from "../serving/host.ts";
import { readBody } from "./body.ts";
import type { AppEnv } from "./logging.ts";
import type { Metrics } from "./metrics.ts";

function planView(host: ModelHost) {
  const inst = host.instance!;
  return {
    id: inst.planId,
    plan: inst.plan,
    ffn_blocks: inst.ffnBlocks,
    build_ms: Math.round(inst.buildMs),
    ...(inst.heal ? { heal: inst.heal } : {}),
  };
}

export function getFuseHandler(host: ModelHost) {
  return (c: Context<AppEnv>) =>
    c.json({
      active: host.instance ? planView(host) : null,
      swaps: host.swaps,
      retiring: host.retiringCount,
      swapping: host.swapInProgress,
      build_progress: host.buildProgress,
    });
}

/**
 * POST /fuse: the plan is built in its own worker while serving goes on, then swapped in; the
 * answer comes once it is live. A newer POST supersedes a build still in progress (409 for the
 * older one).
 */
export function postFuseHandler(host: ModelHost, metrics: Metrics) {
  return async (c: Context<AppEnv>) => {
    const plan = parsePlan(await readBody(c, z.unknown()));
    const { instance, swapMs, rebuiltBytes, reusedBytes } = await host.swap(plan);
    metrics.swaps.inc();
    metrics.swapSeconds.observe(swapMs / 1000);
    metrics.swapRebuiltBytes.inc({}, rebuiltBytes);
    metrics.swapReusedBytes.inc({}, reusedBytes);
    metrics.activePlan.reset();
    metrics.activePlan.set({ plan: instance.planId }, 1);
    c.get("log").set({ plan: instance.planId });
    return c.json({
      active: planView(host),
      swap_ms: Math.round(swapMs),
      rebuilt_bytes: rebuiltBytes,
      reused_bytes: reusedBytes,
    });
  };
}
