import assert from "node:assert/strict";
import { dependencyMatrix, groupRuns, suggestPlan } from "../src/fusion/analyze.ts";
import { fusableRuns } from "../src/fusion/plan.ts";
import { evaluateQuality, windows } from "../src/fusion/evaluate.ts";
import { unfusedBlocks } from "../src/model/blocks.ts";
import { loadCheckpoint } from "../src/model/checkpoint.ts";
import { tensor } from "../src/model/tensor.ts";
import { NAS_LIKE, TINY_NAS, writeRandomModel } from "./helpers.ts";

const IDS = [[5, 900, 17, 2048, 3, 77, 4095, 12], [8, 1, 300, 4000, 22, 9]];

Deno.test("analysis: matrix is upper-triangular, in [0, 2], and a block that contributes nothing has no dependents", async () => {
  const dir = await writeRandomModel({ ...NAS_LIKE, seed: 5 });
  const ck = await loadCheckpoint(dir);
  const blocks = unfusedBlocks(ck);
  const ffn3 = blocks.findIndex((b) => b.kind === "ffn" && b.layers[0] === 3);
  const b3 = blocks[ffn3];
  assert.ok(b3.kind === "ffn");
  // Layer 3's FFN now adds exactly nothing (a new tensor: a checkpoint's own are decoded from the file).
  blocks[ffn3] = { ...b3, down: tensor(b3.down.shape, new Float32Array(b3.down.data.length)) };
  const a = dependencyMatrix(ck, blocks, IDS);
  assert.equal(a.matrix.length, blocks.length);
  assert.equal(a.tokens, 14);
  a.matrix.forEach((row, i) =>
    row.forEach((v, j) => {
      if (j <= i) assert.equal(v, 0);
      assert.ok(v >= 0 && v <= 2, `M[${i}][${j}] = ${v}`);
    })
  );
  assert.ok(
    a.matrix[ffn3].every((v) => Math.abs(v) < 1e-12),
    "removing a zero block changes nothing downstream",
  );
  assert.equal(a.ratios[ffn3], 0);
  assert.ok(a.matrix[0].slice(1).some((v) => v > 1e-3), "removing the first attention block does matter");
  assert.deepEqual(a.blocks.map((b) => b.label).slice(0, 4), ["attn 0", "ffn 0", "attn 1", "ffn 1"]);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("analysis: fusable runs start at any SwiGLU layer and continue through attention-free ones", async () => {
  assert.deepEqual(fusableRuns((await loadCheckpoint(TINY_NAS)).config), [[2, 3, 4, 5, 6, 7, 8]]);
  const dir = await writeRandomModel(NAS_LIKE);
  assert.deepEqual(fusableRuns((await loadCheckpoint(dir)).config), [[1, 2, 3, 4]]);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("analysis: grouping respects the threshold and the width bound; the suggestion drops a last FFN only when loss improves", async () => {
  const cfg = (await loadCheckpoint(TINY_NAS)).config;
  const labels = Array.from(
    { length: 12 },
    (_, l) => ({ index: l, kind: "ffn" as const, layer: l, label: `ffn ${l}` }),
  );
  const matrix: number[][] = Array.from(
    { length: 12 },
    (_, i) => Array.from({ length: 12 }, (_, j) => (j > i ? 0.05 : 0)),
  );
  matrix[4][5] = 0.9; // layer 5 depends strongly on layer 4
  const analysis = { blocks: labels, matrix, ratios: new Array(12).fill(0.1), tokens: 10 };
  assert.deepEqual(groupRuns(analysis, cfg, { maxWidth: 8, threshold: 0.2 }), [[2, 3, 4], [5, 6, 7, 8]]);
  assert.deepEqual(groupRuns(analysis, cfg, { maxWidth: 2, threshold: 0.2 }), [[2, 3], [5, 6], [7, 8]]);
  const losses: Record<string, number> = { "ffn[2-4,5-8]": 2.0, "ffn[2-3,5-8]": 2.1, "ffn[2-4,5-7]": 1.9 };
  const { plan, trials } = await suggestPlan(analysis, cfg, { maxWidth: 8, threshold: 0.2 }, (p) => {
    const id = `ffn[${p.ffn_groups.map((g) => `${g[0]}-${g.at(-1)}`).join(",")}]`;
    return Promise.resolve(losses[id]);
  });
  assert.deepEqual(plan.ffn_groups, [[2, 3, 4], [5, 6, 7]]);
  assert.deepEqual(trials.map((t) => t.id), ["ffn[2-4,5-8]", "ffn[2-3,5-8]", "ffn[2-4,5-7]"]);
});

Deno.test("quality: loss of uniform logits is log V; a model against itself has KL 0 and full agreement", async () => {
  const V = 16;
  const seqs = windows([1, 2, 3, 4, 5, 6, 7], 4);
  assert.deepEqual(seqs, [[1, 2, 3, 4], [5, 6, 7]]);
  const uniform = (ids: number[]) => Promise.resolve(new Float32Array(ids.length * V));
  const r = await evaluateQuality(seqs, V, uniform);
  assert.equal(r.tokens, 5);
  assert.ok(Math.abs(r.loss - Math.log(V)) < 1e-9);
  assert.ok(Math.abs(r.ppl - V) < 1e-6);
  assert.equal(r.kl, undefined);
  const peaked = (ids: number[]) => {
    const out = new Float32Array(ids.length * V);
    ids.forEach((id, t) => (out[t * V + ((id + 1) % V)] = 5));
    return Promise.resolve(out);
  };
  const self = await evaluateQuality(seqs, V, peaked, peaked);
  assert.equal(self.kl, 0);
  assert.equal(self.top1_agreement, 1);
  const vs = await evaluateQuality(seqs, V, uniform, peaked);
  assert.ok(vs.kl! > 0.1);
  assert.ok(vs.top1_agreement! < 1);
});
