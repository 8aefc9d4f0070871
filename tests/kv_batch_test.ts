import assert from "node:assert/strict";
import {
  appendRows,
  type BatchCache,
  disposeBatch,
  dropRows,
  freeBatch,
  packRows,
} from "../src/ort/kv_batch.ts";
import { ort } from "../src/ort/ort.ts";
import { freeHostArray } from "../src/free_memory.ts";
import { asBatch, type KvCache } from "../src/ort/session.ts";
import { relL2 } from "./helpers.ts";
import { onHostDevices } from "./engine_helpers.ts";

const graph = { cache: [{ layer: 0, kvHeads: 2 }], headDim: 2, floatType: "float32" as const };
const KEY = "past_key_values.0.key";

/** A one-row cache whose positions hold `tag * 100 + head * 10 + position`. */
function row(tag: number, length: number): BatchCache {
  const data = new Float32Array(2 * length * 2);
  for (let h = 0; h < 2; h++) {
    for (let p = 0; p < length; p++) {
      data.fill(tag * 100 + h * 10 + p, (h * length + p) * 2, (h * length + p + 1) * 2);
    }
  }
  return {
    width: length,
    lengths: [length],
    tensors: new Map([[KEY, new ort.Tensor("float32", data, [1, 2, length, 2])]]),
  };
}

/** Row b's positions as tags, read back from a batch cache. */
function tags(cache: BatchCache, b: number): number[] {
  const t = cache.tensors.get(KEY)!;
  const data = t.data as Float32Array;
  const out: number[] = [];
  for (let h = 0; h < 2; h++) {
    for (let p = 0; p < cache.lengths[b]; p++) out.push(data[((b * 2 + h) * cache.width + p) * 2]);
  }
  return out;
}

const expected = (tag: number, length: number) =>
  [0, 1].flatMap((h) => Array.from({ length }, (_, p) => tag * 100 + h * 10 + p));

Deno.test("kv batch: rows leave by the last row moving into their place, and join into the room the buffers have", async () => {
  const rows = [row(1, 3), row(2, 5), row(3, 2), row(4, 4)];
  const packed = await packRows(ort, graph, rows.map((cache) => ({ cache, row: 0 })), 8, 6);
  assert.equal(packed.capacity, 6);
  assert.deepEqual(packed.tensors.get(KEY)!.dims, [4, 2, 8, 2], "the tensor shows the rows in use");
  const buffer = (packed.tensors.get(KEY)!.data as Float32Array).buffer;

  const { cache: left, from } = dropRows(ort, packed, [0, 2]);
  assert.deepEqual(from, [3, 1], "row 0 takes the last row (3); row 2 was the last left");
  assert.deepEqual(left.lengths, [4, 5]);
  assert.deepEqual(tags(left, 0), expected(4, 4));
  assert.deepEqual(tags(left, 1), expected(2, 5));

  const grown = await appendRows(ort, left, [{ cache: row(5, 7), row: 0 }, { cache: row(6, 1), row: 0 }]);
  assert.ok(grown, "two rows fit the room of six");
  assert.equal((grown.tensors.get(KEY)!.data as Float32Array).buffer, buffer, "no new memory");
  assert.deepEqual(grown.lengths, [4, 5, 7, 1]);
  for (const [b, [tag, length]] of [[4, 4], [2, 5], [5, 7], [6, 1]].entries()) {
    assert.deepEqual(tags(grown, b), expected(tag, length), `row ${b}`);
  }
  assert.equal(await appendRows(ort, grown, [{ cache: row(7, 9), row: 0 }]), null, "wider than the rows");
  assert.equal(
    await appendRows(ort, grown, [1, 2, 3].map((t) => ({ cache: row(t, 2), row: 0 }))),
    null,
    "more rows than the buffers hold",
  );
});

Deno.test("kv batch: freeing a cache gives back the whole of each buffer, room included; disposing leaves host ones", async () => {
  const packed = await packRows(ort, graph, [{ cache: row(1, 3), row: 0 }], 8, 4);
  const view = packed.tensors.get(KEY)!.data as Float32Array;
  assert.ok(view.length < view.buffer.byteLength / 4, "the tensor views the first of the buffer's rows");
  const kept = await packRows(ort, graph, [{ cache: packed, row: 0 }]);
  const keptBuffer = (kept.tensors.get(KEY)!.data as Float32Array).buffer as ArrayBuffer;
  disposeBatch(kept);
  assert.ok(
    kept.tensors.size === 0 && !keptBuffer.detached,
    "disposed, its host memory waits for a collection",
  );
  freeBatch(packed);
  assert.ok((view.buffer as ArrayBuffer).detached, "freed at once");
  assert.equal(packed.tensors.size, 0);
});

onHostDevices(
  (device) =>
    `kv batch: a batch that outgrows its width is copied wider and its old buffers freed (${device})`,
  async ({ assets, s, ids }) => {
    const vocab = assets.checkpoint.config.vocabSize;
    const prompt = ids.slice(0, 20);
    const alone = await s.step(prompt, s.emptyCache(), "last");
    const first = await s.step([ids[20]], alone.cache, "last");
    const second = await s.step([ids[21]], first.cache, "last");
    // Room for exactly the prompt and one more position: the second step must widen the batch.
    const prefilled = await s.prefillRows([{ ids: prompt, from: null }], "last", 21);
    assert.equal(prefilled.cache.width, 21);
    const batch = await s.regroupRows(null, [], [{ cache: prefilled.cache, row: 0 }], 21);
    const one = await s.decodeBatch([ids[20]], batch.cache!, 21);
    assert.equal(one.cache.width, 21);
    const outgrown = (one.cache.tensors.values().next().value!.data as Float32Array).buffer as ArrayBuffer;
    const two = await s.decodeBatch([ids[21]], one.cache, 64);
    assert.ok(two.cache.width > 21, `widened to ${two.cache.width}`);
    assert.ok(outgrown.detached, "the outgrown buffers are freed at once");
    assert.ok(relL2(one.logits.slice(0, vocab), first.logits) < 1e-5);
    assert.ok(
      relL2(two.logits.slice(0, vocab), second.logits) < 1e-5,
      "the widened copy holds every position",
    );
  },
);

onHostDevices(
  (device) =>
    `kv batch: a batch whose rows leave and join in place decodes each row as it would alone (${device})`,
  async ({ assets, s, ids }) => {
    const vocab = assets.checkpoint.config.vocabSize;
    const starts = [0, 40, 80, 120, 160];
    const lengths = [30, 12, 50, 20, 9];
    const prefill = async (i: number): Promise<KvCache> =>
      (await s.step(ids.slice(starts[i], starts[i] + lengths[i]), s.emptyCache(), "last")).cache;
    /** Row i's logits after it is fed `fed` of its next tokens, decoding alone. */
    const alone = async (i: number, fed: number) => {
      let cache = await prefill(i);
      let logits: Float32Array = new Float32Array();
      for (let k = 0; k <= fed; k++) {
        const r = await s.step([ids[starts[i] + lengths[i] + k]], cache, "last");
        cache = r.cache;
        logits = r.logits;
      }
      return logits;
    };
    // Rows 0-2 with room for two more; two steps; row 1 leaves and rows 3 and 4 join; three steps.
    const first = await Promise.all([0, 1, 2].map(prefill));
    let batch = await s.regroupRows(null, [], first.map((c) => ({ cache: asBatch(c), row: 0 })), 200, 2);
    let rows = batch.from;
    const fed = [0, 0, 0, 0, 0];
    const step = async () => {
      const next = rows.map((i) => ids[starts[i] + lengths[i] + fed[i]]);
      const r = await s.decodeBatch(next, batch.cache!, 200);
      batch = { cache: r.cache, from: rows, redrawn: false };
      const out = rows.map((i, b) => ({
        i,
        fed: fed[i],
        logits: r.logits.slice(b * vocab, (b + 1) * vocab),
      }));
      for (const i of rows) fed[i]++;
      return out;
    };
    const seen = [...await step(), ...await step()];
    const buffer = (batch.cache!.tensors.values().next().value!.data as Float32Array).buffer;
    const joining = await Promise.all([3, 4].map(prefill));
    const all = [...rows];
    const regrouped = await s.regroupRows(
      batch.cache,
      [1],
      joining.map((c) => ({ cache: asBatch(c), row: 0 })),
      200,
    );
    rows = regrouped.from.map((k) => k < all.length ? all[k] : [3, 4][k - all.length]);
    batch = regrouped;
    assert.deepEqual([...rows].sort(), [0, 2, 3, 4]);
    assert.equal(batch.redrawn, false);
    assert.equal(
      (batch.cache!.tensors.values().next().value!.data as Float32Array).buffer,
      buffer,
      "the leave and the joins were done in the batch's own buffers",
    );
    for (let k = 0; k < 3; k++) seen.push(...await step());
    for (const { i, fed: f, logits } of seen) {
      const err = relL2(logits, await alone(i, f));
      assert.ok(err < 1e-5, `row ${i} after ${f} fed: rel err ${err}`);
    }
  },
);

Deno.test("freeHostArray frees an array that is its whole buffer, and never a view into a larger one", () => {
  const whole = new Float32Array(1024);
  freeHostArray(whole);
  assert.ok(whole.buffer.detached && whole.length === 0);
  freeHostArray(whole); // twice is harmless
  const shared = new Float32Array(1024);
  const view = shared.subarray(512);
  freeHostArray(view);
  freeHostArray(shared.subarray(0, 512));
  assert.ok(!shared.buffer.detached && shared.length === 1024 && view.length === 512);
});
