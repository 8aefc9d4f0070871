import type { HostEmbedding } from "../onnx/decoder.ts";
import { readAt } from "../file_io.ts";
import { readWeight } from "../onnx/weight_cache.ts";
import type { ort, OrtApi } from "./ort.ts";

/**
 * The rows of an int8 embedding table that a run's tokens need (DecoderGraph.embedding), read from the
 * table's file a row at a time: a token reads 1 of 128K rows, and a table onnxruntime gathered from
 * became resident row by row as a server saw more tokens (250 of its 263 MB at the 1B shape natively;
 * all of it in WASM's heap). Read here, the rows stay in the kernel's page cache, outside the process.
 */
export class EmbeddingRows {
  private readonly vocab: number;
  private readonly hidden: number;
  private readonly scales: Float32Array;
  private readonly file: Deno.FsFile | null;
  private readonly bytes: Uint8Array | null;

  constructor(table: HostEmbedding) {
    [this.vocab, this.hidden] = table.rows.dims;
    this.scales = new Float32Array(readWeight(table.scales).slice().buffer);
    this.file = "file" in table.rows ? Deno.openSync(table.rows.file) : null;
    this.bytes = "bytes" in table.rows ? table.rows.bytes : null;
  }

  /** The `embed_rows` and `embed_scales` feeds of a run over `ids` ([batch, sequence]). */
  feeds(rt: OrtApi, ids: ort.Tensor): Record<string, ort.Tensor> {
    const tokens = ids.data as Int32Array;
    const h = this.hidden;
    const rows = new Int8Array(tokens.length * h);
    const scales = new Float32Array(tokens.length);
    tokens.forEach((id, i) => {
      if (!(id >= 0 && id < this.vocab)) {
        throw new RangeError(`token id ${id} is outside the vocabulary (${this.vocab})`);
      }
      this.readRow(id, new Uint8Array(rows.buffer, i * h, h));
      scales[i] = this.scales[id];
    });
    return {
      embed_rows: new rt.Tensor("int8", rows, [...ids.dims, h]),
      embed_scales: new rt.Tensor("float32", scales, [...ids.dims, 1]),
    };
  }

  private readRow(id: number, into: Uint8Array): void {
    if (this.bytes) {
      into.set(this.bytes.subarray(id * this.hidden, (id + 1) * this.hidden));
      return;
    }
    if (readAt(this.file!, id * this.hidden, into) < into.length) {
      throw new Error(`the embedding table's file ended at row ${id}`);
    }
  }

  close(): void {
    this.file?.close();
  }
}
