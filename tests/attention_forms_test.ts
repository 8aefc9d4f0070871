import assert from "node:assert/strict";
import { loadAssets, planBlocks } from "../src/instance/build.ts";
import { validatePlan } from "../src/fusion/plan.ts";
import onnxProto from "onnx-proto";
import { type AttentionForm, buildDecoderGraph, pastKey, pastValue } from "../src/onnx/decoder.ts";
import { asBatch, attentionFor, type KvCache, ModelSession } from "../src/ort/session.ts";
import { EVAL_TEXT, HAS_NATIVE, relL2, TINY_LLAMA, TINY_NAS } from "./helpers.ts";

/**
 * The MatMul form of attention (src/onnx/matmul_attention.ts) against onnxruntime's fused operator on
 * the same blocks, through every path a session runs: a prompt prefilled in chunks of different sizes
 * (all logits), then rows of different lengths decoding as one batch, padded and outgrowing their
 * room, for every block kind a plan makes (attention removed or linear, a fused FFN, a block group),
 * on both host devices.
 */
const CASES = [
  { dir: TINY_NAS, plan: { ffn_groups: [] } },
  { dir: TINY_NAS, plan: { ffn_groups: [[3, 4, 5]] } },
  {
    dir: TINY_LLAMA,
    plan: {
      version: 2,
      attention: { remove: [3], linear: [4] },
      ffn_groups: [[2, 3]],
      block_groups: [[5, 6]],
    },
  },
];

for (const device of ["wasm", "cpu"] as const) {
  for (const { dir, plan } of CASES) {
    Deno.test({
      name: `attention forms: MatMul form equals the fused operator (1e-5) on ${dir.split("/").pop()} ${
        JSON.stringify(plan)
      } (${device})`,
      ignore: device === "cpu" && !HAS_NATIVE,
      sanitizeResources: false,
      sanitizeOps: false,
      fn: async () => {
        const text = await Deno.readTextFile(EVAL_TEXT);
        // The linear attention's maps are fitted on calibration text.
        const assets = { ...await loadAssets(dir), calibrationText: EVAL_TEXT };
        const cfg = assets.checkpoint.config;
        const { blocks } = await planBlocks(assets, validatePlan(plan, cfg));
        const session = async (attention: AttentionForm) => {
          const graph = buildDecoderGraph(assets.checkpoint, blocks, undefined, undefined, { attention });
          return await ModelSession.create(graph, device, cfg.vocabSize);
        };
        const fused = await session("fused");
        const matmul = await session("matmul");
        try {
          const g = matmul.graph;
          assert.ok(g.newKv, "the MatMul form keeps caches in place");
          const ids = assets.tokenizer.encode(text).slice(0, 200);
          const close = (a: Float32Array, b: Float32Array, what: string) =>
            assert.ok(relL2(b, a) < 1e-5, `${what}: rel err ${relL2(b, a)}`);

          // Three prompts of different lengths, each prefilled in two chunks, every position's logits.
          const prompts = [ids.slice(0, 61), ids.slice(10, 23), ids.slice(50, 150)];
          const caches: { fused: KvCache; matmul: KvCache }[] = [];
          for (const [p, prompt] of prompts.entries()) {
            let f = fused.emptyCache();
            let m = matmul.emptyCache();
            for (const part of [prompt.slice(0, 7 + p), prompt.slice(7 + p)]) {
              const rf = await fused.step(part, f, "all");
              const rm = await matmul.step(part, m, "all");
              close(rf.logits, rm.logits, `prompt ${p} prefill`);
              f = rf.cache;
              m = rm.cache;
            }
            caches.push({ fused: f, matmul: m });
          }
          // One batch of the three rows; the MatMul form's rows get room past their lengths (and
          // outgrow it: 40 steps > the quarter, at least 32, given on top of the longest row).
          let bf = await fused.packRows(caches.map((c) => ({ cache: asBatch(c.fused), row: 0 })));
          let bm = await matmul.packRows(caches.map((c) => ({ cache: asBatch(c.matmul), row: 0 })), 400);
          assert.ok(bm.width > 100, "rows kept in place have room");
          for (let step = 0; step < 40; step++) {
            const next = prompts.map((_, p) => ids[150 + step + p]);
            const rf = await fused.decodeBatch(next, bf);
            const rm = await matmul.decodeBatch(next, bm, 400);
            close(rf.logits, rm.logits, `batched step ${step}`);
            bf = rf.cache;
            bm = rm.cache;
          }
          assert.deepEqual(bm.lengths, [101, 53, 140]);
        } finally {
          await fused.release();
          await matmul.release();
        }
      },
    });
  }
}

Deno.test("attention forms: the host devices build fp32 graphs with the MatMul form; WebGPU and fp16 the fused operator", () => {
  assert.equal(attentionFor("wasm", "fp32"), "matmul");
  assert.equal(attentionFor("wasm", "fp16"), "fused");
  assert.equal(attentionFor("cpu", "fp32"), "matmul");
  assert.equal(attentionFor("webgpu", "fp32"), "fused");
});

Deno.test("attention forms: the MatMul form has no fused attention and no presents; its outputs are each step's keys and values", async () => {
  const assets = await loadAssets(TINY_NAS);
  const graph = buildDecoderGraph(assets.checkpoint, assets.blocks, undefined, undefined, {
    attention: "matmul",
  });
  const fused = buildDecoderGraph(assets.checkpoint, assets.blocks);
  const text = new TextDecoder("latin1").decode(graph.model.graph);
  assert.ok(!text.includes("GroupQueryAttention"));
  assert.ok(new TextDecoder("latin1").decode(fused.model.graph).includes("GroupQueryAttention"));
  assert.ok(!text.includes("present.2.key") && text.includes("new.2.key") && text.includes("new.2.value"));
  // The caches are read where they lie: a past enters only views of itself (Unsqueeze) that MatMuls
  // read, never a Concat or any node that would copy a row's whole cache each layer and step.
  const nodes = onnxProto.onnx.ModelProto.decode(graph.model.graph).graph!.node!;
  const readers = (value: string) => nodes.filter((n) => n.input!.includes(value));
  for (const layer of graph.cache.map((c) => c.layer)) {
    for (const past of [pastKey(layer), pastValue(layer)]) {
      const views = readers(past).filter((n) => n.opType !== "Shape");
      assert.deepEqual(
        views.map((n) => n.opType),
        ["Unsqueeze"],
        `${past} read by ${views.map((n) => n.opType)}`,
      );
      const users = readers(views[0].output![0]).map((n) => n.opType);
      assert.ok(
        users.length > 0 && users.every((op) => op === "MatMul" || op === "FusedMatMul"),
        `${past}: ${users}`,
      );
    }
  }
});

Deno.test("attention forms: the MatMul form is refused for fp16 graphs", async () => {
  const assets = await loadAssets(TINY_NAS);
  assert.throws(
    () =>
      buildDecoderGraph(assets.checkpoint, assets.blocks, { dtype: "fp16", quantize: "none" }, undefined, {
        attention: "matmul",
      }),
    /fp32 graphs only/,
  );
});
