import assert from "node:assert/strict";
import {
  attachFiles,
  encodeSafetensors,
  releaseDecoded,
  rowSource,
  SafetensorsFile,
  tensorRows,
} from "../src/model/safetensors.ts";
import { tensor } from "../src/model/tensor.ts";
import { f16ToF32, f32ToF16 } from "../src/model/dtype.ts";
import { InputError } from "../src/errors.ts";

const sample = () => ({
  a: tensor([2, 3], Float32Array.from([1, -2, 3.5, 0, 1e-3, 65504])),
  b: tensor([4], Float32Array.from([0.25, -0.5, 7, 9])),
});

function withHeader(header: unknown, dataBytes: number): Uint8Array {
  const json = new TextEncoder().encode(JSON.stringify(header));
  const out = new Uint8Array(8 + json.length + dataBytes);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
  out.set(json, 8);
  return out;
}

Deno.test("safetensors: F32 and F16 round trips", () => {
  const f32 = SafetensorsFile.parse("x", encodeSafetensors(sample(), "F32"));
  assert.deepEqual([...f32.read("a").data], [...sample().a.data]);
  assert.deepEqual(f32.read("a").shape, [2, 3]);
  const f16 = SafetensorsFile.parse("x", encodeSafetensors(sample(), "F16"));
  assert.deepEqual([...f16.read("b").data], [0.25, -0.5, 7, 9]);
  assert.equal(f16.read("a").data[5], 65504);
});

Deno.test("safetensors: BF16 decodes by bit shift", () => {
  const bits = new Uint16Array([0x3f80, 0xc000, 0x4049]); // 1, -2, 3.140625
  const bytes = withHeader({ t: { dtype: "BF16", shape: [3], data_offsets: [0, 6] } }, 6);
  bytes.set(new Uint8Array(bits.buffer), bytes.length - 6);
  assert.deepEqual([...SafetensorsFile.parse("x", bytes).read("t").data], [1, -2, 3.140625]);
});

Deno.test("dtype: half conversion is round-to-nearest-even and exact on all finite halves", () => {
  const all = new Uint16Array(65536).map((_, i) => i);
  const back = f32ToF16(f16ToF32(all));
  for (let i = 0; i < 65536; i++) {
    const exp = (i >> 10) & 0x1f;
    if (exp === 0x1f && (i & 0x3ff)) continue; // NaN payloads need not survive
    assert.equal(back[i], i, `half ${i}`);
  }
  assert.equal(f32ToF16(Float32Array.from([1e6]))[0], 0x7c00);
});

Deno.test("safetensors: truncated or lying files fail with the tensor named", () => {
  const good = encodeSafetensors(sample(), "F32");
  const expect = (bytes: Uint8Array, re: RegExp) =>
    assert.throws(
      () => SafetensorsFile.parse("m.safetensors", bytes),
      (e: unknown) => e instanceof InputError && re.test(e.message),
      String(re),
    );
  expect(good.slice(0, 5), /too short/);
  expect(good.slice(0, 40), /header length \d+ exceeds the file size/);
  expect(good.slice(0, good.length - 4), /tensor "b": data_offsets end 40 is past the end of the data/);
  expect(
    withHeader({ t: { dtype: "F32", shape: [3], data_offsets: [0, 8] } }, 8),
    /tensor "t": data_offsets \[0, 8\] hold 8 bytes but F32\[3\] needs 12/,
  );
  expect(
    withHeader({ t: { dtype: "I8", shape: [1], data_offsets: [0, 1] } }, 1),
    /tensor "t": dtype I8 is not supported/,
  );
  expect(
    withHeader({ t: { dtype: "F32", shape: "x", data_offsets: [0, 4] } }, 4),
    /tensor "t": malformed entry/,
  );
  expect(
    withHeader({
      t: { dtype: "F32", shape: [2], data_offsets: [0, 8] },
      u: { dtype: "F32", shape: [1], data_offsets: [4, 8] },
    }, 8),
    /overlaps/,
  );
  expect(withHeader([1, 2], 0), /not a JSON object/);
  const notJson = withHeader({}, 0);
  notJson[8] = 0x7b + 1;
  expect(notJson, /not valid JSON/);
});

Deno.test("safetensors: a file-backed tensor decodes on read, is posted as a reference and reattached", async () => {
  const path = await Deno.makeTempFile({ suffix: ".safetensors" });
  try {
    await Deno.writeFile(path, encodeSafetensors(sample(), "F16"));
    const file = await SafetensorsFile.open(path);
    const a = file.tensor("a");
    assert.deepEqual(a.shape, [2, 3]);
    assert.deepEqual([...a.data], [...f16ToF32(f32ToF16(sample().a.data))]);
    // Within a task the decoded data is kept (a loop indexing t.data decodes once), and not after it.
    assert.equal(a.data, a.data);
    const first = a.data;
    await new Promise((r) => setTimeout(r, 1));
    assert.notEqual(a.data, first);
    assert.deepEqual([...a.data], [...first]);
    // Posting keeps the shape and the reference, never the data; attachFiles gives the accessor back.
    const posted = structuredClone({ layers: [{ a }], tied: a });
    assert.equal("data" in posted.tied, false);
    assert.deepEqual(posted.tied.shape, [2, 3]);
    attachFiles(posted);
    assert.deepEqual([...posted.layers[0].a.data], [...first]);
    assert.equal(posted.layers[0].a, posted.tied, "one tensor posted twice stays one");
    // releaseDecoded frees what the task kept at once (the array empties); the next read decodes again.
    const kept = a.data;
    releaseDecoded();
    assert.equal(kept.length, 0);
    assert.deepEqual([...a.data], [...first]);
    // A file that is gone is a checkpoint error when read, naming the file.
    await Deno.remove(path);
    await new Promise((r) => setTimeout(r, 1));
    assert.throws(() => a.data, (e: Error) => e instanceof InputError && e.message.includes(path));
  } finally {
    await Deno.remove(path).catch(() => {});
  }
});

Deno.test("safetensors: rows of a file-backed tensor read alone equal those of its whole decode", async () => {
  const path = await Deno.makeTempFile({ suffix: ".safetensors" });
  try {
    const rows = 37, width = 11;
    const data = Float32Array.from({ length: rows * width }, (_, i) => Math.sin(i) * 3);
    await Deno.writeFile(path, encodeSafetensors({ t: tensor([rows, width], data) }, "F16"));
    const file = await SafetensorsFile.open(path);
    const t = file.tensor("t");
    // Read before the whole tensor is ever decoded (its bytes alone), then from the decoded copy.
    assert.equal(rowSource(t)?.path, path);
    const alone = [tensorRows(t, 0, 5), tensorRows(t, 5, 36), tensorRows(t, 36, 37)];
    // Into a caller's buffer, which the rows then are (a walk over a table reuses one).
    const into = new Float32Array(31 * width);
    const reused = [tensorRows(t, 0, 5, into), tensorRows(t, 5, 36, into)];
    assert.ok(reused.every((r) => r.buffer === into.buffer) && reused[1].length === 31 * width);
    assert.deepEqual([...reused[1]], [...alone[1]]);
    const whole = t.data;
    assert.equal(rowSource(t), null, "decoded, its rows are at hand");
    assert.equal(rowSource(tensor([rows, width], data)), null);
    assert.deepEqual(alone.flatMap((a) => [...a]), [...whole]);
    assert.deepEqual([...tensorRows(t, 3, 9)], [...whole.subarray(3 * width, 9 * width)]);
    assert.deepEqual([...tensorRows(tensor([rows, width], data), 2, 4)], [
      ...data.subarray(2 * width, 4 * width),
    ]);
  } finally {
    await Deno.remove(path).catch(() => {});
  }
});
