import assert from "node:assert/strict";
import { applyPlan, type FusionForm } from "../src/fusion/apply.ts";
import { validatePlan } from "../src/fusion/plan.ts";
import { layerOf, unfusedBlocks } from "../src/model/blocks.ts";
import { loadCheckpoint } from "../src/model/checkpoint.ts";
import { streamGradient } from "../bench/studies/backward.ts";
import { referenceForward } from "../src/model/forward.ts";
import { tensor } from "../src/model/tensor.ts";
import { rng } from "../src/numeric.ts";
import { TINY_LLAMA, TINY_NAS } from "./helpers.ts";

/**
 * The stream gradient against central differences of the loss L = sum(logits * R) for a fixed random
 * R, along random directions of the stream: every block kind on the path (attention with GQA and RoPE,
 * FFN, a fused wide FFN or its parallel form, a linear attention, a block group) is crossed.
 */
async function checkAgainstDifferences(dir: string, plan: unknown, form: FusionForm, startLayer: number) {
  const ckpt = await loadCheckpoint(dir);
  const fits = new Map(
    [4].map((l) => {
      const random = rng(l);
      const d = ckpt.config.hidden;
      return [l, {
        norm: Float32Array.from({ length: d }, () => 0.5 + random()),
        weight: tensor([d, d], Float32Array.from({ length: d * d }, () => (random() - 0.5) * 0.1)),
      }];
    }),
  );
  const validated = validatePlan(plan, ckpt.config);
  const blocks = applyPlan(unfusedBlocks(ckpt), validated, form, dir === TINY_LLAMA ? fits : new Map());
  const ids = [5, 17, 300, 42, 9, 1000, 3, 77, 250, 12];
  const t = ids.length;
  const d = ckpt.config.hidden;
  const start = blocks.findIndex((b) => layerOf(b) === startLayer);
  let x: Float64Array | null = null;
  referenceForward(ckpt, blocks, ids, {
    logits: "none",
    onDelta: (i, _delta, input) => {
      if (i === start) x = input;
    },
  });
  const random = rng(7);
  const r = Float64Array.from({ length: t * ckpt.config.vocabSize }, () => random() - 0.5);
  const loss = (stream: Float64Array) => {
    const { logits } = referenceForward(ckpt, blocks, ids, { start: { block: start, x: stream } });
    return logits.reduce((s, v, i) => s + v * r[i], 0);
  };
  const g = streamGradient(ckpt, blocks, ids, { block: start, x: x! }, () => r);
  for (let trial = 0; trial < 3; trial++) {
    const u = Float64Array.from({ length: t * d }, () => random() - 0.5);
    const eps = 1e-5;
    const plus = loss(x!.map((v, i) => v + eps * u[i]));
    const minus = loss(x!.map((v, i) => v - eps * u[i]));
    const numeric = (plus - minus) / (2 * eps);
    const analytic = g.reduce((s, v, i) => s + v * u[i], 0);
    assert.ok(
      Math.abs(numeric - analytic) <= 1e-6 * Math.max(1, Math.abs(numeric)),
      `direction ${trial}: analytic ${analytic}, central difference ${numeric}`,
    );
  }
}

Deno.test("stream gradient: tiny-llama through attention, a linear attention, a fused FFN and a block group", async () => {
  const plan = {
    version: 2,
    attention: { remove: [3], linear: [4] },
    ffn_groups: [[2, 3]],
    block_groups: [[5, 6]],
  };
  await checkAgainstDifferences(TINY_LLAMA, plan, "fused", 1);
});

Deno.test("stream gradient: tiny-nas from inside its attention-free run, parallel form of a group", async () => {
  await checkAgainstDifferences(TINY_NAS, { ffn_groups: [[5, 6, 7]] }, "parallel", 4);
});
