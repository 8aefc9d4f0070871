import type { DecoderGraph } from "../onnx/decoder.ts";
import { freeHostArray } from "../free_memory.ts";
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
  /**
   * Rows its host buffers hold, when more than `lengths.length` (packRows' `rowCapacity`): rows that
   * join later are copied into them (appendRows) instead of the whole batch into new memory.
   */
  capacity?: number;
}

/** Where a row of a new batch comes from: row `row` of `cache`, its first `length` positions (all by default). */
export interface RowSource {
  cache: BatchCache;
  row: number;
  length?: number;
}

type FloatData = Float32Array | Uint16Array;

/** The whole buffer behind each host cache tensor's data that packRows made with room for more rows. */
const roomy = new WeakMap<FloatData, FloatData>();

/** Elements one row of a cache tensor takes. */
const rowElements = (t: Pick<ort.Tensor, "dims">) => t.dims[1] * t.dims[2] * t.dims[3];

/**
 * A cache tensor of `rows` rows shaped like `like` ([rows, kvHeads, width, headDim]) over the first
 * rows of `whole`, remembered as having room for the rest.
 */
function rowsOf(rt: OrtApi, like: Pick<ort.Tensor, "dims">, whole: FloatData, rows: number): ort.Tensor {
  const view = whole.subarray(0, rows * rowElements(like));
  roomy.set(view, whole);
  const dims = [rows, like.dims[1], like.dims[2], like.dims[3]];
  return view instanceof Uint16Array
    ? new rt.Tensor("float16", view, dims)
    : new rt.Tensor("float32", view, dims);
}

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

/** The positions a row source takes: its first `length`, or all its row holds. */
export const sourceLength = (s: RowSource) => Math.min(s.length ?? Infinity, s.cache.lengths[s.row]);

/**
 * Copies each source's first `lengths[j]` positions of cache tensor `name` into row `first + j` of
 * `whole`, laid out [rows, kvHeads, width, headDim]; each source cache's data is read once.
 */
async function copyRows(
  whole: FloatData,
  name: string,
  sources: RowSource[],
  lengths: number[],
  at: { first: number; kvHeads: number; width: number; headDim: number },
  data = new Map<BatchCache, Map<string, FloatData>>(),
): Promise<void> {
  const { first, kvHeads: kvH, width, headDim: hd } = at;
  for (const s of sources) if (!data.has(s.cache)) data.set(s.cache, await hostData(s.cache));
  sources.forEach((s, j) => {
    const src = data.get(s.cache)!.get(name)!;
    for (let h = 0; h < kvH; h++) {
      const from = (s.row * kvH + h) * s.cache.width * hd;
      whole.set(src.subarray(from, from + lengths[j] * hd), ((first + j) * kvH + h) * width * hd);
    }
  });
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
  /** Rows the buffers hold (see BatchCache.capacity). */
  rowCapacity = sources.length,
): Promise<BatchCache> {
  const lengths = sources.map(sourceLength);
  const width = Math.max(minWidth, ...lengths);
  const rows = sources.length;
  const hd = graph.headDim;
  const data = new Map<BatchCache, Map<string, FloatData>>();
  const tensors = new Map<string, ort.Tensor>();
  for (const [name] of sources[0]?.cache.tensors ?? []) {
    const kvH = graph.cache.find((c) => name.startsWith(`past_key_values.${c.layer}.`))!.kvHeads;
    const held = Math.max(rows, rowCapacity) * kvH * width * hd;
    const whole = graph.floatType === "float16" ? new Uint16Array(held) : new Float32Array(held);
    await copyRows(whole, name, sources, lengths, { first: 0, kvHeads: kvH, width, headDim: hd }, data);
    tensors.set(name, rowsOf(rt, { dims: [rows, kvH, width, hd] }, whole, rows));
  }
  return { width, lengths, tensors, capacity: Math.max(rows, rowCapacity) };
}

/**
 * `cache` without its rows `drop`, in place: each is overwritten by the last row still in it (one
 * row's copy, not the batch's), so rows move. Returns the cache and, for each of its rows, the row it
 * was. Host tensors only; `cache` is consumed.
 */
export function dropRows(
  rt: OrtApi,
  cache: BatchCache,
  drop: number[],
): { cache: BatchCache; from: number[] } {
  const from = cache.lengths.map((_, row) => row);
  const lengths = [...cache.lengths];
  const tensors = new Map<string, ort.Tensor>();
  const wholes = new Map([...cache.tensors].map(([name, t]) => [name, wholeOf(t)]));
  for (const row of [...new Set(drop)].sort((a, b) => b - a)) {
    const last = from.length - 1;
    if (row !== last) {
      for (const [name, t] of cache.tensors) {
        const n = rowElements(t);
        wholes.get(name)!.copyWithin(row * n, last * n, (last + 1) * n);
      }
      from[row] = from[last];
      lengths[row] = lengths[last];
    }
    from.pop();
    lengths.pop();
  }
  for (const [name, t] of cache.tensors) tensors.set(name, rowsOf(rt, t, wholes.get(name)!, from.length));
  return { cache: { width: cache.width, lengths, tensors, capacity: cache.capacity }, from };
}

/** The buffer a host cache tensor's rows lie in: with room for more where packRows made it so. */
function wholeOf(t: ort.Tensor): FloatData {
  const data = t.data as FloatData;
  return roomy.get(data) ?? data;
}

/** A batch's rows, the positions each may hold and the rows its buffers hold. */
export type BatchRoom = { rows: number; width: number; capacity: number };

/** Whether `n` more rows, the longest `longest` positions, fit a batch's buffers without new ones. */
export function roomFor(batch: BatchRoom, n: number, longest: number): boolean {
  return longest <= batch.width && batch.rows + n <= batch.capacity;
}

/**
 * `cache` with `sources` appended as its last rows, copied into the room its buffers have (only the
 * new rows are copied); null where they do not fit its width or its capacity. `cache` is consumed.
 */
export async function appendRows(
  rt: OrtApi,
  cache: BatchCache,
  sources: RowSource[],
): Promise<BatchCache | null> {
  const rows = cache.lengths.length;
  const lengths = sources.map(sourceLength);
  const room = { rows, width: cache.width, capacity: cache.capacity ?? rows };
  if (!roomFor(room, sources.length, Math.max(...lengths))) return null;
  const data = new Map<BatchCache, Map<string, FloatData>>();
  const tensors = new Map<string, ort.Tensor>();
  for (const [name, t] of cache.tensors) {
    const whole = wholeOf(t);
    const [, kvHeads, width, headDim] = t.dims;
    await copyRows(whole, name, sources, lengths, { first: rows, kvHeads, width, headDim }, data);
    tensors.set(name, rowsOf(rt, t, whole, rows + sources.length));
  }
  return { width: cache.width, lengths: [...cache.lengths, ...lengths], tensors, capacity: cache.capacity };
}

/** Frees GPU-resident tensors of a batch cache; host ones are left to the garbage collector. */
export function disposeBatch(cache: BatchCache): void {
  for (const t of cache.tensors.values()) if (t.location === "gpu-buffer") t.dispose();
  cache.tensors.clear();
}

/**
 * The host buffer behind a cache's first tensor (null on the GPU): caches that share it share every
 * buffer, as a batch redrawn in place shares its predecessor's and a prefill run its rows' earlier
 * cache where that had room.
 */
export function bufferOf(cache: BatchCache): ArrayBufferLike | null {
  const t = cache.tensors.values().next().value;
  return t && t.location !== "gpu-buffer" ? (t.data as FloatData).buffer : null;
}

/**
 * Frees a batch cache that nothing else holds, its host buffers now rather than at a collection: a
 * batch widened, redrawn or evicted leaves a set of them (8 rows of the 1B shape at 160 positions:
 * 32 tensors of 2.6 MB), and V8 collected them late, after the next sets were drawn beside them.
 */
export function freeBatch(cache: BatchCache): void {
  for (const t of cache.tensors.values()) if (t.location !== "gpu-buffer") freeHostArray(wholeOf(t));
  disposeBatch(cache);
}
