import type { FusionPlan } from "../fusion/plan.ts";
import { buildInstance, type ModelAssets } from "../runtime/engine.ts";
import { generate } from "../runtime/generate.ts";
import type { Device } from "../runtime/ort.ts";
import { DEFAULT_SAMPLING } from "../runtime/sampling.ts";

export interface DecodeCase {
  device: Device;
  plan: string;
  /** Where tokens were chosen: on the GPU with batched readback (WebGPU), or on the host. */
  sampling: "gpu" | "host";
  tokens: number;
  prefill_ms: number;
  tokens_per_second: number;
}

/** End-to-end greedy decode speed of the served engine, one plan at a time (prefill timed apart). */
export async function benchDecode(
  assets: ModelAssets,
  plans: FusionPlan[],
  device: Device,
  tokens: number,
): Promise<DecodeCase[]> {
  const prompt = assets.tokenizer.encode("import os\nimport sys\n\ndef main(");
  const cfg = assets.checkpoint.config;
  const out: DecodeCase[] = [];
  for (const plan of plans) {
    const inst = await buildInstance(assets, plan, device);
    try {
      const t0 = performance.now();
      let first = 0;
      const run = generate({
        session: inst.session,
        tokenizer: assets.tokenizer,
        promptIds: prompt,
        params: { ...DEFAULT_SAMPLING, maxTokens: tokens, stop: [], ignoreEos: true },
        eosTokenIds: cfg.eosTokenIds,
        maxPositions: cfg.maxPositions,
      });
      let r = await run.next();
      first = performance.now();
      while (!r.done) r = await run.next();
      const end = performance.now();
      out.push({
        device,
        plan: inst.planId,
        sampling: device === "webgpu" ? "gpu" : "host",
        tokens: r.value.completionTokens,
        prefill_ms: first - t0,
        tokens_per_second: (r.value.completionTokens - 1) / ((end - first) / 1000),
      });
    } finally {
      await inst.session.release();
    }
  }
  return out;
}
