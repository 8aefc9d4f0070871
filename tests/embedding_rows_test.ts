import assert from "node:assert/strict";
import { join } from "node:path";
import { EmbeddingRows } from "../src/ort/embedding_rows.ts";
import { ort } from "../src/ort/ort.ts";

const VOCAB = 5;
const HIDDEN = 6;
const table = Int8Array.from({ length: VOCAB * HIDDEN }, (_, i) => (i * 7) % 255 - 127);
const scales = Float32Array.from({ length: VOCAB }, (_, i) => 0.5 + i);
const asBytes = (a: Int8Array | Float32Array) => new Uint8Array(a.buffer.slice(0));

Deno.test("embedding rows: a run's tokens get their rows and scales, read from the table's file or its bytes", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeFile(join(dir, "rows.bin"), asBytes(table));
    const stored = {
      scales: { elem: "float32" as const, dims: [VOCAB], byteLength: VOCAB * 4, bytes: asBytes(scales) },
    };
    const sources = [
      {
        rows: {
          elem: "int8" as const,
          dims: [VOCAB, HIDDEN],
          byteLength: table.length,
          file: join(dir, "rows.bin"),
        },
      },
      {
        rows: {
          elem: "int8" as const,
          dims: [VOCAB, HIDDEN],
          byteLength: table.length,
          bytes: asBytes(table),
        },
      },
    ];
    for (const { rows } of sources) {
      const reader = new EmbeddingRows({ rows, scales: stored.scales });
      try {
        const ids = [4, 0, 2, 4];
        const feeds = reader.feeds(ort, new ort.Tensor("int32", Int32Array.from(ids), [2, 2]));
        assert.deepEqual(feeds.embed_rows.dims, [2, 2, HIDDEN]);
        assert.deepEqual(feeds.embed_scales.dims, [2, 2, 1]);
        assert.deepEqual(
          Array.from(feeds.embed_rows.data as Int8Array),
          ids.flatMap((id) => Array.from(table.subarray(id * HIDDEN, (id + 1) * HIDDEN))),
        );
        assert.deepEqual(Array.from(feeds.embed_scales.data as Float32Array), ids.map((id) => scales[id]));
        for (const bad of [-1, VOCAB]) {
          assert.throws(
            () => reader.feeds(ort, new ort.Tensor("int32", Int32Array.of(bad), [1, 1])),
            /outside the vocabulary/,
          );
        }
      } finally {
        reader.close();
      }
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
