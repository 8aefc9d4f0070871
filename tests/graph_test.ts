import assert from "node:assert/strict";
import { GraphBuilder, storedBytes } from "../src/onnx/builder.ts";
import { unfusedBlocks } from "../src/model/blocks.ts";
import { loadCheckpoint } from "../src/model/checkpoint.ts";
import { referenceForward } from "../src/model/forward.ts";
import { buildDecoderGraph } from "../src/onnx/decoder.ts";
import { splitFactor } from "../src/onnx/split_k.ts";
import { FLOAT_WEIGHTS, formatName, NATIVE_QUANTIZED } from "../src/onnx/format.ts";
import { readWeight, WeightCache, WeightStore } from "../src/onnx/weight_cache.ts";
import { type Tensor, tensor, transpose2d } from "../src/model/tensor.ts";
import { dequantize, quantize, symmetric32 } from "../src/onnx/quantize.ts";
import { f16ToF32, f32ToF16 } from "../src/model/dtype.ts";
import { rng } from "../src/numeric.ts";
import { applyPlan } from "../src/fusion/apply.ts";
import { validatePlan } from "../src/fusion/plan.ts";
import { createSession, ort, resolveDevice } from "../src/ort/ort.ts";
import { disposeCache, ModelSession } from "../src/ort/session.ts";
import {
  HAS_NATIVE,
  HAS_WEBGPU,
  NAS_LIKE,
  type RandomModelSpec,
  relL2,
  TINY_NAS,
  writeRandomModel,
} from "./helpers.ts";

const LLAMA_LIKE: RandomModelSpec = {
  modelType: "llama",
  hidden: 96,
  heads: 6,
  kvHeads: 3,
  intermediate: 40,
  layers: Array.from({ length: 3 }, () => ({ attention: "full", ffn: "swiglu" })),
};

const IDS = [5, 900, 17, 2048, 3, 77, 4095, 12, 600];

/** Random architectures (GQA ratios 1/2/4, linear and no-op blocks) against the float64 reference. */
for (const [name, spec] of [["nas-like", NAS_LIKE], ["llama-like", LLAMA_LIKE]] as const) {
  for (const device of ["wasm", "webgpu"] as const) {
    Deno.test({
      name:
        `graph: random ${name} model on ${device} matches the float64 reference, with and without KV cache`,
      ignore: device === "webgpu" && !HAS_WEBGPU,
      sanitizeResources: false,
      sanitizeOps: false,
      fn: async () => {
        const dir = await writeRandomModel({ ...spec, seed: 7 });
        const ck = await loadCheckpoint(dir);
        const blocks = unfusedBlocks(ck);
        const graph = buildDecoderGraph(ck, blocks);
        const session = await ModelSession.create(graph, await resolveDevice(device), ck.config.vocabSize);
        const ref = referenceForward(ck, blocks, IDS).logits;
        const full = await session.step(IDS, session.emptyCache());
        disposeCache(full.cache);
        assert.ok(relL2(full.logits, ref) < 1e-5, `prefill rel err ${relL2(full.logits, ref)}`);
        // Same positions fed as prefix + single steps through the cache.
        let { cache } = await session.step(IDS.slice(0, 4), session.emptyCache());
        const V = ck.config.vocabSize;
        for (let i = 4; i < IDS.length; i++) {
          const r = await session.step([IDS[i]], cache);
          cache = r.cache;
          const want = ref.subarray(i * V, (i + 1) * V);
          assert.ok(relL2(r.logits, want) < 1e-5, `cached step ${i} rel err ${relL2(r.logits, want)}`);
        }
        disposeCache(cache);
        await session.release();
        await Deno.remove(dir, { recursive: true });
      },
    });
  }
}

Deno.test("graph: only layers with attention get past/present tensors, named as Optimum does", async () => {
  const dir = await writeRandomModel(NAS_LIKE);
  const ck = await loadCheckpoint(dir);
  const graph = buildDecoderGraph(ck, unfusedBlocks(ck));
  assert.deepEqual(graph.cache.map((c) => c.layer), [0, 1, 6, 7]);
  assert.deepEqual(graph.cache.map((c) => c.kvHeads), [2, 1, 4, 2]);
  const session = await ModelSession.create(graph, await resolveDevice("wasm"), ck.config.vocabSize);
  const { cache } = await session.step([1, 2], session.emptyCache());
  assert.deepEqual(
    [...cache.tensors.keys()].sort(),
    [0, 1, 6, 7].flatMap((l) => [`past_key_values.${l}.key`, `past_key_values.${l}.value`]).sort(),
  );
  assert.deepEqual(cache.tensors.get("past_key_values.1.key")!.dims, [1, 1, 2, 16]);
  await session.release();
  await Deno.remove(dir, { recursive: true });
});

Deno.test("graph: a decode step's split linears: parts per shape, the same weight bytes in [parts, K / parts, N]", async () => {
  // The 1B shapes: q/k/v stacked, o, gate and up, down; a fused group of four; tiny widths stay whole.
  const cases: [number, number, number][] = [
    [2048, 3072, 16],
    [2048, 2048, 16],
    [2048, 8192, 16],
    [8192, 2048, 64],
    [2048, 32768, 4],
    [32768, 2048, 64],
    [2048, 128256, 1],
    [256, 768, 1],
    [768, 256, 1],
  ];
  for (const [k, n, parts] of cases) assert.equal(splitFactor(k, n), parts, `[${k}, ${n}]`);
  assert.equal(splitFactor(768, 256, { workgroups: 4096, minPart: 32, minInner: 256 }), 16);

  const ck = await loadCheckpoint(TINY_NAS);
  const blocks = unfusedBlocks(ck);
  const cache = new WeightCache("fp32");
  const split = { workgroups: 4096, minPart: 64, minInner: 256 };
  const whole = buildDecoderGraph(ck, blocks, FLOAT_WEIGHTS, cache, { weightsAsInputs: true });
  const step = buildDecoderGraph(ck, blocks, FLOAT_WEIGHTS, cache, { weightsAsInputs: true, step: split });
  assert.deepEqual([...step.model.weightInputs.keys()], [...whole.model.weightInputs.keys()]);
  let splitCount = 0;
  for (const [name, w] of whole.model.weightInputs) {
    const s = step.model.weightInputs.get(name)!;
    assert.equal(s.byteLength, w.byteLength, name);
    if (s.dims.length === 3) {
      splitCount++;
      const [k, n] = w.dims;
      assert.deepEqual(s.dims, [splitFactor(k, n, split), k / splitFactor(k, n, split), n], name);
    } else assert.deepEqual(s.dims, w.dims, name);
  }
  assert.equal(step.model.weightInputs.get("lm_head")?.dims.length ?? 2, 2, "the head is never split");
  assert.ok(splitCount >= 9 * 3, `${splitCount} linears split`);
  assert.equal(step.nodeCount, whole.nodeCount + 4 * splitCount);
});

Deno.test("graph: weights are external data, so the protobuf stays small whatever the model's size", async () => {
  const onnxProto = (await import("onnx-proto")).default;
  const ckpt = await loadCheckpoint(TINY_NAS);
  const { model } = buildDecoderGraph(ckpt, unfusedBlocks(ckpt));
  assert.ok(model.graph.length < 200_000, `graph protobuf is ${model.graph.length} bytes`);
  const decoded = onnxProto.onnx.ModelProto.decode(model.graph);
  const external = decoded.graph!.initializer!.filter((t) => t.dataLocation === 1);
  const files = new Map(model.weights.map((f) => [f.path, f.weight]));
  for (const t of external) {
    const kv = Object.fromEntries(t.externalData!.map((e) => [e.key, e.value]));
    assert.equal(kv.location, `${t.name}.bin`, "one file per weight, named after it");
    assert.equal(Number(kv.offset), 0);
    assert.equal(Number(kv.length), files.get(kv.location)?.byteLength);
  }
  assert.ok(external.length > 50);
  assert.equal(external.length, files.size);
  // tiny-nas has about 9.3M parameters, stored as fp32.
  const bytes = storedBytes(model);
  assert.ok(bytes > 30e6 && bytes < 45e6, `${bytes} bytes`);
});

Deno.test("graph: a weight cache kept across plans converts only changed groups, and the bytes are identical", async () => {
  const ckpt = await loadCheckpoint(TINY_NAS);
  const blocks = unfusedBlocks(ckpt);
  for (const format of [FLOAT_WEIGHTS, { dtype: "fp16", quantize: "int4" }] as const) {
    const store = new WeightStore();
    const plan = (...groups: number[][]) =>
      applyPlan(blocks, validatePlan({ ffn_groups: groups }, ckpt.config));
    const first = new WeightCache(formatName(format), new Map(), store.dir);
    buildDecoderGraph(ckpt, plan([3, 4, 5]), format, first);
    store.add(first.added);
    let fusedTouched = 0;
    const a = plan([3, 4, 5], [6, 7, 8]);
    const watch = (t: Tensor): Tensor => ({
      shape: t.shape,
      get data() {
        fusedTouched++;
        return t.data;
      },
    });
    const spy = a.map((b) =>
      b.kind === "ffn" && b.layers.join() === "3,4,5"
        ? { ...b, gate: watch(b.gate), up: watch(b.up), down: watch(b.down) }
        : b
    );
    const second = new WeightCache(formatName(format), store.entries, store.dir);
    const cached = buildDecoderGraph(ckpt, spy, format, second);
    assert.equal(fusedTouched, 0, "a cached group's fused weights are never computed again");
    const fresh = buildDecoderGraph(ckpt, a, format);
    assert.equal(second.builtBytes + second.reusedBytes, storedBytes(fresh.model));
    const group = [...second.added.keys()];
    assert.ok(group.length > 0 && group.every((k) => k.includes("/ffn.6_7_8.")), group.join());
    const files = new Map(fresh.model.weights.map((f) => [f.path, f.weight]));
    for (const f of cached.model.weights) {
      assert.ok("file" in f.weight, `${f.path} is kept as a file, not in memory`);
      assert.deepEqual(readWeight(f.weight), readWeight(files.get(f.path)!), f.path);
    }
    // Entries no live instance uses are deleted with their files; closing removes the directory.
    store.add(second.added);
    const dropped = [...first.used].filter((k) => !second.used.has(k));
    assert.ok(dropped.length > 0, "the unfused layers 6-8 are no longer used");
    const droppedFiles = dropped.map((k) => store.entries.get(k)!).map((w) => "file" in w ? w.file : "");
    await store.keepOnly(second.used);
    assert.deepEqual([...store.entries.keys()].sort(), [...second.used].sort());
    for (const file of droppedFiles) assert.throws(() => Deno.statSync(file), Deno.errors.NotFound);
    const dir = store.dir;
    store.close();
    assert.throws(() => Deno.statSync(dir), Deno.errors.NotFound);
  }
});

Deno.test("graph: a cache directory frees what it made once written, and never what it borrowed", () => {
  const store = new WeightStore();
  try {
    const cache = new WeightCache("fp32", new Map(), store.dir);
    const made = Float32Array.of(1, 2, 3);
    const borrowed = Float32Array.of(4, 5);
    const a = cache.get("made", () => ({ elem: "float32", dims: [3], data: made }));
    const b = cache.get("borrowed", () => ({ elem: "float32", dims: [2], data: borrowed, borrowed: true }));
    assert.equal(made.length, 0, "made data is freed once its file is written");
    assert.deepEqual([...borrowed], [4, 5], "borrowed data belongs to someone else");
    assert.deepEqual(new Float32Array(readWeight(a).buffer), Float32Array.of(1, 2, 3));
    assert.deepEqual(new Float32Array(readWeight(b).buffer), Float32Array.of(4, 5));
    assert.equal(a.byteLength, 12);
    // In memory, borrowed data is copied: its owner may free it (releaseDecoded).
    const memory = new WeightCache("fp32").get(
      "w",
      () => ({ elem: "float32", dims: [2], data: borrowed, borrowed: true }),
    );
    borrowed.fill(0);
    assert.deepEqual(new Float32Array(readWeight(memory).buffer), Float32Array.of(4, 5));
  } finally {
    store.close();
  }
});

Deno.test({
  name: "graph: a session takes file-backed weights (a cache directory) as it takes weights in memory",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    // onnxruntime-web reads a file's bytes through FileBytes and native onnxruntime through links to
    // the cache's files: if either read anything but the files, the session would not build or its
    // logits would differ.
    const ckpt = await loadCheckpoint(TINY_NAS);
    const blocks = unfusedBlocks(ckpt);
    const cases = [
      ["wasm", FLOAT_WEIGHTS],
      ["wasm", { dtype: "fp32", quantize: "int8", integer: true }],
      ...(HAS_NATIVE ? [["cpu", { dtype: "fp32", quantize: "int4", ...NATIVE_QUANTIZED }]] as const : []),
    ] as const;
    for (const [device, format] of cases) {
      const store = new WeightStore();
      try {
        const files = buildDecoderGraph(
          ckpt,
          blocks,
          format,
          new WeightCache(formatName(format), new Map(), store.dir),
        );
        assert.ok(files.model.weights.every((f) => "file" in f.weight));
        const logits = [];
        for (const graph of [files, buildDecoderGraph(ckpt, blocks, format)]) {
          const session = await ModelSession.create(graph, device, ckpt.config.vocabSize);
          logits.push(await session.logitsOf(IDS));
          await session.release();
        }
        assert.ok(relL2(logits[0], logits[1]) < 1e-6, `${device} ${formatName(format)}`);
      } finally {
        store.close();
      }
    }
  },
});

Deno.test({
  name:
    "webgpu fp16 precision: MatMul and multi-row MatMulNBits accumulate in fp16, one-row MatMulNBits in fp32",
  ignore: !HAS_WEBGPU,
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    // Why plain fp16 graphs get a wider tolerance at 1B widths than fp16 activations with int8 weights.
    const device = await resolveDevice("webgpu");
    const random = rng(3);
    const n = 256;
    const relErr = async (k: number, op: "MatMul" | "MatMulNBits", rows = 1) => {
      const w = tensor([n, k], Float32Array.from({ length: n * k }, () => (random() * 2 - 1) / Math.sqrt(k)));
      const x = f16ToF32(f32ToF16(Float32Array.from({ length: rows * k }, () => random() * 2 - 1)));
      const g = new GraphBuilder();
      const input = g.input("x", "float16", [rows, k]);
      let used: Tensor;
      if (op === "MatMul") {
        used = tensor([n, k], f16ToF32(f32ToF16(w.data)));
        const t = transpose2d(used);
        const bytes = new Uint8Array(f32ToF16(t.data).buffer);
        g.op(
          "MatMul",
          [input, g.weight("w", { elem: "float16", dims: [k, n], byteLength: bytes.byteLength, bytes })],
          {},
          "y",
        );
      } else {
        const p = quantize(w, symmetric32(8));
        used = dequantize({ ...p, scales: f16ToF32(f32ToF16(p.scales)) });
        const b = g.weight("b", {
          elem: "uint8",
          dims: [n, k / 32, 32],
          byteLength: p.packed.byteLength,
          bytes: p.packed,
        });
        const s = g.weight("s", {
          elem: "float16",
          dims: [n * k / 32],
          byteLength: p.scales.length * 2,
          bytes: new Uint8Array(f32ToF16(p.scales).buffer),
        });
        g.node("MatMulNBits", [input, b, s], { K: k, N: n, bits: 8, block_size: 32 }, ["y"], "com.microsoft");
      }
      g.output("y", "float16", [rows, n]);
      const session = await createSession(device, g.encode("precision"), { executionProviders: [device] });
      const out = await session.run({ x: new ort.Tensor("float16", f32ToF16(x), [rows, k]) });
      const y = Float32Array.from(out.y.data as unknown as ArrayLike<number>);
      await session.release();
      const ref = Float64Array.from({ length: rows * n }, (_, j) => {
        const [r, o] = [Math.floor(j / n), j % n];
        let sum = 0;
        for (let i = 0; i < k; i++) sum += x[r * k + i] * used.data[o * k + i];
        return sum;
      });
      return relL2(y, ref);
    };
    const short = await relErr(256, "MatMul");
    const long = await relErr(8192, "MatMul");
    assert.ok(long > 3 * short && long > 5e-3, `fp16 MatMul: ${short} at K=256, ${long} at K=8192`);
    const nbits = await relErr(8192, "MatMulNBits");
    assert.ok(nbits < 2e-3, `MatMulNBits with fp16 activations: ${nbits} at K=8192`);
    const prefill = await relErr(8192, "MatMulNBits", 12);
    assert.ok(prefill > 2 * nbits, `MatMulNBits, 12 rows: ${prefill} at K=8192 (one row: ${nbits})`);
  },
});
