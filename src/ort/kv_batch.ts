import type { DecoderGraph } from "../onnx/decoder.ts";
import { ort, type OrtApi } from "./ort.ts";

/**
 * The attention caches of sequences decoded together: each cache tensor is [rows, kvHeads, width,
 * headDim], row b's `lengths[b]` real positions first (GroupQueryAttention reads each row up to its
 * own length, so what follows is never read). A step writes one position after every row's own (in
 * these tensors where steps write in place, into the presents that replace them elsewhere), so the
 * layout survives steps untouched; it is redrawn only when rows join or leave, or outgrow the width.
 */
export interface BatchCache {
  width: number;
  lengths: number[];
  tensors: Map<string, ort.Tensor>;
}

/** Where a row of a new batch comes from: row `row` of `cache`, its first `length` positions (all by default). */
export interface RowSource {
  cache: BatchCache;
  row: number;
  length?: number;
}

type FloatData = Float32Array | Uint16Array;

/**
 * Host copies of a cache's tensors. A cache is never changed in place (a step makes a new one), so a
 * GPU cache read for several packs (rows kept for reuse, then the new batch) is downloaded once.
 */
const downloaded = new WeakMap<BatchCache, Map<string, FloatData>>();

async function hostData(cache: BatchCache): Promise<Map<string, FloatData>> {
  const known = downloaded.get(cache);
  if (known) return known;
  // All downloads at once: under Deno each GPU readback waits >= 11 ms on its own, so one per cache
  // tensor in turn made every join or leave of a 1B model's 32 tensors cost a third of a second.
  const read = await Promise.all(
    [...cache.tensors].map(async ([name, t]) => {
      const data = t.location === "gpu-buffer" ? await t.getData() : t.data;
      // Where the runtime has Float16Array (Deno does), onnxruntime-web hands float16 data over as
      // one: copying its elements into the Uint16Array a float16 tensor is built from would convert
      // values instead of moving bits, so the halves are read as their raw bits.
      const bits = t.type === "float16" && !(data instanceof Uint16Array)
        ? new Uint16Array((data as ArrayBufferView).buffer, (data as ArrayBufferView).byteOffset, t.size)
        : data as FloatData;
      return [name, bits] as const;
    }),
  );
  const out = new Map<string, FloatData>(read);
  downloaded.set(cache, out);
  return out;
}

/** Bytes the cache of `tokens` positions of one sequence takes (keys and values of every layer). */
export function kvBytesPerToken(graph: Pick<DecoderGraph, "cache" | "headDim" | "floatType">): number {
  const elem = graph.floatType === "float16" ? 2 : 4;
  return graph.cache.reduce((n, c) => n + 2 * c.kvHeads * graph.headDim * elem, 0);
}

/**
 * A new batch cache whose rows are `sources`, in order, at the width of the longest of them (or
 * `minWidth`): the one copy a join or a leave costs (the steps between copy nothing on the host).
 */
export async function packRows(
  rt: OrtApi,
  graph: Pick<DecoderGraph, "cache" | "headDim" | "floatType">,
  sources: RowSource[],
  /** Positions a row may hold, when more than the longest (steps that write in place grow into them). */
  minWidth = 0,
): Promise<BatchCache> {
  const lengths = sources.map((s) => Math.min(s.length ?? Infinity, s.cache.lengths[s.row]));
  const width = Math.max(minWidth, ...lengths);
  const rows = sources.length;
  const hd = graph.headDim;
  const data = new Map<BatchCache, Map<string, FloatData>>();
  for (const s of sources) if (!data.has(s.cache)) data.set(s.cache, await hostData(s.cache));
  const tensors = new Map<string, ort.Tensor>();
  for (const [name] of sources[0]?.cache.tensors ?? []) {
    const kvH = graph.cache.find((c) => name.startsWith(`past_key_values.${c.layer}.`))!.kvHeads;
    const half = graph.floatType === "float16";
    const out = half ? new Uint16Array(rows * kvH * width * hd) : new Float32Array(rows * kvH * width * hd);
    sources.forEach((s, b) => {
      const src = data.get(s.cache)!.get(name)!;
      const len = lengths[b];
      const srcWidth = s.cache.width;
      for (let h = 0; h < kvH; h++) {
        const from = (s.row * kvH + h) * srcWidth * hd;
        const to = (b * kvH + h) * width * hd;
        out.set(src.subarray(from, from + len * hd), to);
      }
    });
    const dims = [rows, kvH, width, hd];
    tensors.set(
      name,
      half
        ? new rt.Tensor("float16", out as Uint16Array, dims)
        : new rt.Tensor("float32", out as Float32Array, dims),
    );
  }
  return { width, lengths, tensors };
}

/** Frees GPU-resident tensors of a batch cache; host ones are left to the garbage collector. */
export function disposeBatch(cache: BatchCache): void {
  for (const t of cache.tensors.values()) if (t.location === "gpu-buffer") t.dispose();
  cache.tensors.clear();
}
