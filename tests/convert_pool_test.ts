import assert from "node:assert/strict";
import { encodeSafetensors, rowSource, SafetensorsFile } from "../src/model/safetensors.ts";
import { type Tensor, tensor } from "../src/model/tensor.ts";
import { quantize, quantizeColumns, quantizeRows, sliceRows } from "../src/onnx/quantize.ts";
import { ConvertHelpers, ConvertPool } from "../src/onnx/convert_pool.ts";
import { quantizesWide } from "../src/onnx/quantize.ts";
import { buildInstance, loadAssets } from "../src/instance/build.ts";
import { RemoteInstance } from "../src/instance/remote_instance.ts";
import type { BuildSpec } from "../src/instance/protocol.ts";
import { planId, UNFUSED } from "../src/fusion/plan.ts";
import { resolveGraphOptions } from "../src/ort/ort.ts";
import type { GenerateParams } from "../src/decode/generate.ts";
import { DEFAULT_SAMPLING } from "../src/sampling/sampling.ts";
import { HAS_NATIVE, writeRandomModel } from "./helpers.ts";
import { runToEnd } from "./engine_helpers.ts";

/** A weight of two whole slices and part of a third, values of several magnitudes a row. */
function weight(k: number, extra = 37): Tensor {
  const n = 2 * sliceRows(k) + extra;
  let s = 7;
  const data = Float32Array.from({ length: n * k }, (_, i) => {
    s = (s * 1103515245 + 12345) >>> 0;
    return ((s / 2 ** 32) - 0.5) * (1 + ((i / k) | 0) % 5);
  });
  return tensor([n, k], data);
}

const same = (a: ArrayLike<number>, b: ArrayLike<number>, what: string) => {
  assert.equal(a.length, b.length, what);
  for (let i = 0; i < a.length; i++) {
    if (a[i] !== b[i]) assert.fail(`${what}: element ${i}: ${a[i]} != ${b[i]}`);
  }
};

Deno.test("convert pool: every conversion on helper threads equals the one-thread conversion byte for byte", async () => {
  const w = weight(256);
  const helpers = await ConvertHelpers.start(3);
  const pool = new ConvertPool(helpers.buffers);
  try {
    for (
      const layout of [
        { bits: 4 as const, block: 32, zeroPoints: false },
        { bits: 4 as const, block: 128, zeroPoints: true },
        { bits: 8 as const, block: 32, zeroPoints: false },
      ]
    ) {
      const a = quantize(w, layout), b = quantize(w, layout, pool.convert);
      const what = JSON.stringify(layout);
      same(b.packed, a.packed, `${what} levels`);
      same(b.scales, a.scales, `${what} scales`);
      if (layout.zeroPoints) same(b.zeros!, a.zeros!, `${what} zero points`);
    }
    for (const q of ["int8", "int4"] as const) {
      const a = quantizeColumns(w, q, 64), b = quantizeColumns(w, q, 64, pool.convert);
      same(b.q, a.q, `columns ${q}`);
      same(b.scales, a.scales, `columns ${q} scales`);
    }
    const a = quantizeRows(w), b = quantizeRows(w, pool.convert);
    same(b.q, a.q, "rows");
    same(b.scales, a.scales, "rows' scales");
    // The helpers overwrite their copy of a slice (the int4 round trip), never the weight's rows.
    same(w.data, weight(256).data, "the weight after its conversions");
  } finally {
    helpers.close();
  }
});

Deno.test("convert pool: helpers read a file-backed weight's rows themselves; a file gone fails naming it", async () => {
  const path = await Deno.makeTempFile({ suffix: ".safetensors" });
  const helpers = await ConvertHelpers.start(2);
  const pool = new ConvertPool(helpers.buffers);
  try {
    const w = weight(512, 5);
    await Deno.writeFile(path, encodeSafetensors({ w }, "F16"));
    const file = await SafetensorsFile.open(path);
    const layout = { bits: 4 as const, block: 128, zeroPoints: true };
    const t = file.tensor("w");
    assert.equal(rowSource(t)?.path, path, "the helpers are given the file, not the rows");
    const a = quantize(t, layout), b = quantize(t, layout, pool.convert);
    same(b.packed, a.packed, "levels");
    same(b.scales, a.scales, "scales");
    same(b.zeros!, a.zeros!, "zero points");
    await Deno.remove(path);
    assert.throws(
      () => quantize(t, layout, pool.convert),
      (e: Error) => e.message.includes(`cannot read ${path}`),
    );
  } finally {
    helpers.close();
    await Deno.remove(path).catch(() => {});
  }
});

Deno.test("convert pool: a one-slice weight converts in the calling thread; ended helpers fail a conversion", async () => {
  const helpers = await ConvertHelpers.start(2);
  const pool = new ConvertPool(helpers.buffers);
  const small = tensor([64, 256], Float32Array.from({ length: 64 * 256 }, (_, i) => Math.sin(i)));
  const layout = { bits: 4 as const, block: 32, zeroPoints: false };
  same(quantize(small, layout, pool.convert).packed, quantize(small, layout).packed, "one slice");
  helpers.close();
  const w = weight(256, 0);
  assert.throws(() => quantize(w, layout, pool.convert), /its helper threads were ended/);
  // Broken, the pool converts in the calling thread from then on.
  same(quantize(w, layout, pool.convert).packed, quantize(w, layout).packed, "after the failure");
});

/** A one-layer checkpoint whose 4096-token head (5.2M weights) is wider than a slice. */
const wideModel = () =>
  writeRandomModel({
    modelType: "llama",
    hidden: 1280,
    heads: 10,
    kvHeads: 2,
    intermediate: 512,
    layers: [{ attention: "full", ffn: "swiglu" }],
  });

for (const device of ["wasm", "cpu"] as const) {
  for (const quantize of ["int8", "int4"] as const) {
    Deno.test({
      name:
        `convert pool: a ${device} ${quantize} build on helpers gives the logits of one built in its own thread`,
      ignore: device === "cpu" && !HAS_NATIVE,
      fn: async () => {
        const dir = await wideModel();
        const helpers = await ConvertHelpers.start(2);
        try {
          const assets = await loadAssets(dir);
          const graph = await resolveGraphOptions("fp32", quantize, device);
          assert.ok(quantizesWide(assets.checkpoint.config, graph));
          const ids = [1, 17, 300, 4000, 9];
          const logits = [];
          for (const convert of [undefined, helpers.buffers]) {
            const inst = await buildInstance(assets, UNFUSED, device, graph, undefined, undefined, {
              convert,
            });
            logits.push(await inst.logitsOf(ids));
            await inst.release();
          }
          same(logits[1], logits[0], "logits");
        } finally {
          helpers.close();
          await Deno.remove(dir, { recursive: true });
        }
      },
    });
  }
}

Deno.test("convert pool: a served build's helpers are started and ended by the serving thread", async () => {
  const dir = await wideModel();
  try {
    const assets = await loadAssets(dir);
    const graph = await resolveGraphOptions("fp32", "int8", "wasm");
    const spec: BuildSpec = {
      modelDir: dir,
      checkpoint: null,
      plan: UNFUSED,
      planId: planId(UNFUSED),
      device: "wasm",
      graph,
      weights: new Map(),
      weightDir: await Deno.makeTempDir(),
      convertThreads: 2,
    };
    const threads = () => [...Deno.readDirSync("/proc/self/task")].length;
    const before = threads();
    const built = await RemoteInstance.build(spec).ready;
    const inline = await buildInstance(assets, UNFUSED, "wasm", graph);
    const params: GenerateParams = {
      ...DEFAULT_SAMPLING,
      temperature: 0,
      maxTokens: 6,
      stop: [],
      ignoreEos: true,
    };
    const ids = [1, 17, 300];
    const served = built.instance.generate(ids, params, new AbortController().signal);
    let r = await served.next();
    while (!r.done) r = await served.next();
    const { summary } = await runToEnd(inline.engine, ids, params);
    assert.deepEqual(r.value.ids, summary.ids);
    assert.equal(summary.ids.length, 6);
    // The helpers' threads are gone once the build is: the instance worker's stay.
    await built.instance.close();
    await inline.release();
    await new Promise((r) => setTimeout(r, 500));
    assert.ok(threads() <= before, `${threads()} threads after, ${before} before`);
    await Deno.remove(spec.weightDir, { recursive: true });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
