import assert from "node:assert/strict";
import { applyPlan } from "../src/fusion/apply.ts";
import { planId, validatePlan } from "../src/fusion/plan.ts";
import { unfusedBlocks } from "../src/model/blocks.ts";
import { loadCheckpoint } from "../src/model/checkpoint.ts";
import { referenceForward } from "../src/model/forward.ts";
import { buildDecoderGraph } from "../src/onnx/decoder.ts";
import { resolveDevice } from "../src/ort/ort.ts";
import { disposeCache, ModelSession } from "../src/ort/session.ts";
import { InputError } from "../src/errors.ts";
import { golden, NAS_LIKE, relL2, TINY_LLAMA, TINY_NAS, writeRandomModel } from "./helpers.ts";

Deno.test("plan: valid plans pass; bad ones name the group and the rule", async () => {
  const cfg = (await loadCheckpoint(TINY_NAS)).config;
  assert.deepEqual(validatePlan({ ffn_groups: [[3, 4, 5], [6, 7, 8]] }, cfg).version, 1);
  assert.equal(planId(validatePlan({ version: 1, ffn_groups: [[2, 3, 4, 5, 6, 7, 8]] }, cfg)), "ffn[2-8]");
  assert.equal(planId(validatePlan({ ffn_groups: [] }, cfg)), "unfused");
  const bad: [unknown, RegExp][] = [
    [
      { ffn_groups: [[7, 8, 9]] },
      /ffn_groups\[0\] \[7,8,9\]: layer 9 has attention; only the first layer of a group may have attention/,
    ],
    [
      { ffn_groups: [[3, 4], [4, 5]] },
      /ffn_groups\[1\] \[4,5\]: layer 4 is already in ffn_groups\[0\] \[3,4\]; no layer may be in two groups/,
    ],
    [
      { ffn_groups: [[11, 12]] },
      /ffn_groups\[0\] \[11,12\]: layer 12 is out of range \(the model has 12 layers/,
    ],
    [{ ffn_groups: [[3, 5]] }, /layers must be consecutive and ascending \(3 is followed by 5\)/],
    [{ ffn_groups: [[4, 3]] }, /consecutive and ascending/],
    [{ ffn_groups: [[3]] }, /ffn_groups.0: a group needs at least two layers/],
    [{ ffn_groups: [[3, -4]] }, /ffn_groups.0.1/],
    [{ ffn_groups: "3-5" }, /ffn_groups/],
    [{ version: 3, ffn_groups: [] }, /version: expected 1 or 2, got 3/],
    [{ ffn_group: [[3, 4]] }, /ffn_group/],
    [null, /invalid plan/],
  ];
  for (const [plan, re] of bad) {
    assert.throws(
      () => validatePlan(plan, cfg),
      (e: unknown) => e instanceof InputError && re.test(e.message),
      String(re),
    );
  }
});

Deno.test("plan: a group may not include a layer without a SwiGLU FFN", async () => {
  const dir = await writeRandomModel(NAS_LIKE);
  const cfg = (await loadCheckpoint(dir)).config;
  assert.throws(() => validatePlan({ ffn_groups: [[4, 5, 6]] }, cfg), /layer 5 has attention/);
  assert.throws(() => validatePlan({ ffn_groups: [[6, 7]] }, cfg), /layer 6 has no SwiGLU FFN \(linear\)/);
  assert.throws(() => validatePlan({ ffn_groups: [[1, 2, 3, 4, 5]] }, cfg), /layer 5 has attention/);
  validatePlan({ ffn_groups: [[1, 2, 3, 4]] }, cfg);
  await Deno.remove(dir, { recursive: true });
});

/** The algebra: one wide FFN computes exactly the parallel sum of its members. */
async function fusedVsParallel(dir: string, groups: number[][], validate = true) {
  const ck = await loadCheckpoint(dir);
  // tiny-llama has attention everywhere, so no plan is valid for it; its FFN shapes and weights still
  // exercise the algebra when the two forms are built from the same (hypothetical) grouping.
  const plan = validate
    ? validatePlan({ ffn_groups: groups }, ck.config)
    : { version: 1 as const, ffn_groups: groups };
  const base = unfusedBlocks(ck);
  const fused = applyPlan(base, plan, "fused");
  const parallel = applyPlan(base, plan, "parallel");
  const ids = [17, 250, 1000, 3, 4000, 99, 12, 512];
  const device = await resolveDevice("wasm");
  const logits = [];
  for (const blocks of [fused, parallel]) {
    const graph = buildDecoderGraph(ck, blocks);
    const s = await ModelSession.create(graph, device, ck.config.vocabSize);
    const r = await s.step(ids, s.emptyCache());
    disposeCache(r.cache);
    await s.release();
    logits.push(r.logits);
  }
  return { ck, base, fused, parallel, ids, fusedLogits: logits[0], parallelLogits: logits[1] };
}

Deno.test("fusion exactness: fused == parallel-unfused to 1e-5 (fp32, onnxruntime) on tiny-nas and tiny-llama shapes", async () => {
  for (
    const [dir, groups] of [[TINY_NAS, [[3, 4, 5], [6, 7, 8]]], [TINY_NAS, [[2, 3, 4, 5, 6, 7, 8]]], [
      TINY_LLAMA,
      [[2, 3]],
    ]] as const
  ) {
    const { fusedLogits, parallelLogits } = await fusedVsParallel(
      dir,
      groups.map((g) => [...g]),
      dir === TINY_NAS,
    );
    const err = relL2(fusedLogits, parallelLogits);
    assert.ok(err < 1e-5, `${dir} ${JSON.stringify(groups)}: rel err ${err}`);
  }
});

Deno.test("fusion exactness: random small models, mixed widths, in onnxruntime and in float64", async () => {
  for (const seed of [1, 2, 3]) {
    const dir = await writeRandomModel({ ...NAS_LIKE, seed });
    const { ck, fused, parallel, ids, fusedLogits, parallelLogits } = await fusedVsParallel(dir, [[
      1,
      2,
      3,
      4,
    ]]);
    assert.ok(
      relL2(fusedLogits, parallelLogits) < 1e-5,
      `seed ${seed}: ${relL2(fusedLogits, parallelLogits)}`,
    );
    const a = referenceForward(ck, fused, ids).logits;
    const b = referenceForward(ck, parallel, ids).logits;
    // Folded gains are rounded to float32 once, so float64 agrees to float32 precision, not beyond.
    assert.ok(relL2(a, b) < 1e-6, `float64 seed ${seed}: ${relL2(a, b)}`);
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("fusion: the graph has one gate/up/down MatMul triple per group, and the fused widths add up", async () => {
  const ck = await loadCheckpoint(TINY_NAS);
  const base = unfusedBlocks(ck);
  const unfused = buildDecoderGraph(ck, base);
  const plan = validatePlan({ ffn_groups: [[3, 4, 5], [6, 7, 8]] }, ck.config);
  const blocks = applyPlan(base, plan);
  const fused = buildDecoderGraph(ck, blocks);
  // Each attention layer has q, k and v stacked and o (QK^T and PV are inside GroupQueryAttention);
  // each FFN block gate, up, down; plus lm_head.
  const attnMatmuls = 6 * 2;
  assert.equal(unfused.matmulCount, attnMatmuls + 12 * 3 + 1);
  assert.equal(fused.matmulCount, attnMatmuls + (12 - 6 + 2) * 3 + 1);
  const groups = blocks.filter((b) => b.kind === "ffn" && b.layers.length > 1);
  assert.deepEqual(groups.map((g) => g.kind === "ffn" && [g.layers, g.gate.shape, g.down.shape, g.norm]), [
    [[3, 4, 5], [2304, 256], [256, 2304], null],
    [[6, 7, 8], [2304, 256], [256, 2304], null],
  ]);
});

Deno.test("fusion: tiny-nas fused logits match an independent float64 evaluation of x + sum_j FFN_j(norm_j(x))", async () => {
  const ck = await loadCheckpoint(TINY_NAS);
  const plan = validatePlan({ ffn_groups: [[3, 4, 5], [6, 7, 8]] }, ck.config);
  const base = unfusedBlocks(ck);
  // The reference keeps every member's own weights and norm gain: nothing of the fused block is reused.
  const parallel = applyPlan(base, plan, "parallel");
  const graph = buildDecoderGraph(ck, applyPlan(base, plan, "fused"));
  const s = await ModelSession.create(graph, await resolveDevice("wasm"), ck.config.vocabSize);
  for (const c of (await golden(TINY_NAS)).cases) {
    const ref = referenceForward(ck, parallel, c.input_ids, { logits: "last" }).logits;
    const r = await s.step(c.input_ids, s.emptyCache());
    disposeCache(r.cache);
    const last = r.logits.subarray(r.logits.length - ck.config.vocabSize);
    assert.ok(relL2(last, ref) < 1e-5, `rel err ${relL2(last, ref)}`);
    // And the approximation is real but small: fused differs from the sequential golden logits.
    const drift = relL2(last, c.last_logits);
    assert.ok(drift > 1e-4 && drift < 0.5, `fused vs sequential drift ${drift}`);
  }
  await s.release();
});
