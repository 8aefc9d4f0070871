import type { Context } from "hono";
import type { ModelHost } from "../runtime/host.ts";
import { readBody } from "./errors.ts";
import type { Metrics } from "./metrics.ts";
import { z } from "zod";

/** The plan is validated by the host against the model, so the body is passed through as it came. */
const anyJson = z.unknown();

function planView(host: ModelHost) {
  const inst = host.instance!;
  return { id: inst.planId, plan: inst.plan, ffn_blocks: inst.ffnBlocks, build_ms: Math.round(inst.buildMs) };
}

export function getFuseHandler(host: ModelHost) {
  return (c: Context) =>
    c.json({
      active: host.instance ? planView(host) : null,
      swaps: host.swaps,
      retiring: host.retiringCount,
      swapping: host.swapInProgress,
    });
}

/** Builds the new plan's session in the background of serving, then swaps; answers once live. */
export function postFuseHandler(host: ModelHost, metrics: Metrics) {
  return async (c: Context) => {
    const body = await readBody(c, anyJson);
    const t0 = performance.now();
    const inst = await host.swap(body);
    metrics.swaps.inc();
    metrics.swapSeconds.observe((performance.now() - t0) / 1000);
    metrics.activePlan.reset();
    metrics.activePlan.set({ plan: inst.planId }, 1);
    return c.json({ active: planView(host), swap_ms: Math.round(performance.now() - t0) });
  };
}
