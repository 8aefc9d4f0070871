import type { Block, FfnBlock } from "../model/blocks.ts";
import type { ModelConfig } from "../model/config.ts";
import type { Tensor } from "../model/tensor.ts";
import { tensorRows } from "../model/safetensors.ts";
import { embedsInt8, type GraphOptions, type Quantization } from "./format.ts";

/** Weight-only quantization of the MatMul weights: none (the float type), or 8 / 4 bits a weight. */

/** Weights per scale unless GraphOptions.block says otherwise: onnxruntime's MatMulNBits block, 32 along K. */
export const BLOCK = 32;

export const BITS: Record<Exclude<Quantization, "none">, 4 | 8> = { int8: 8, int4: 4 };

/**
 * How MatMulNBits stores one weight: bits a weight, weights per scale along K, and whether each block
 * has its own zero point (asymmetric) or the implicit one, 2^(bits-1).
 */
export interface NbitsLayout {
  bits: 4 | 8;
  block: number;
  zeroPoints: boolean;
}

/**
 * A [N, K] weight in MatMulNBits' layout: B uint8 [N, K/block, block * bits / 8], one float scale a
 * block, and with zero points [N, ceil(K/block / 2)] uint8, two blocks' zero points a byte, low nibble first.
 */
export interface PackedWeight extends NbitsLayout {
  n: number;
  k: number;
  packed: Uint8Array;
  scales: Float32Array;
  zeros?: Uint8Array;
}

/** Bytes a row of `blocks` int4 zero points takes: two a byte. */
export const zeroPointBytes = (blocks: number) => Math.ceil(blocks / 2);

/** The byte that holds block i's zero point in a [N, blocks] grid; zeroPointShift, its nibble (low first). */
function zeroPointByte(i: number, blocks: number): number {
  const b = i % blocks;
  return ((i - b) / blocks) * zeroPointBytes(blocks) + (b >> 1);
}
const zeroPointShift = (i: number, blocks: number) => ((i % blocks) & 1) * 4;

/** Symmetric scale of `length` values from `at`: max|x| / qmax (1 for an all-zero run). */
function symmetricScale(data: Float32Array, at: number, length: number, qmax: number): number {
  let amax = 0;
  for (let i = 0; i < length; i++) amax = Math.max(amax, Math.abs(data[at + i]));
  return Math.fround(amax / qmax) || 1;
}

/**
 * The layout of a [N, K] weight in these options, or null where it stays in float: the options' block
 * (32 unless set), halved down to 32 until it divides K, since MatMulNBits needs whole blocks along K.
 */
export function nbitsLayout(k: number, g: GraphOptions): NbitsLayout | null {
  if (g.quantize === "none") return null;
  let block = g.block ?? BLOCK;
  while (block > BLOCK && k % block !== 0) block /= 2;
  if (k % block !== 0) return null;
  const bits = BITS[g.quantize];
  return { bits, block, zeroPoints: bits === 4 && (g.asymmetric ?? false) };
}

/** 32 along K, symmetric: the layout of every device's graphs but native onnxruntime's. */
export const symmetric32 = (bits: 4 | 8): NbitsLayout => ({ bits, block: BLOCK, zeroPoints: false });

/** Where the asymmetric fit starts: the block's range, and the range shrunk by a tenth toward zero. */
const RANGE_SHRINKS = [1, 0.9];
/** Least-squares refits of (scale, zero point) after each start. */
const REFITS = 1;

/**
 * The int4 scale and zero point of a block (written to `fit` as [scale, zero]) that keep the smaller
 * squared error among a few fits: from each start in RANGE_SHRINKS, the range over 15 steps, then
 * a least-squares refit of x ~ s * (q - z) for the rounding that fit gave. On tiny-nas' weights at 128
 * a block this keeps the relative squared error of symmetric absmax at 32 a block (9.1e-3 against
 * 9.4e-3; absmax at 128: 1.4e-2). Loops are plain and allocate nothing: a 1B model has 10M blocks,
 * and its load quantizes them all (16-24 ns a weight, about what symmetric absmax at 32 took).
 */
function asymmetricFit(data: Float32Array, at: number, length: number, fit: Float64Array): void {
  const end = at + length;
  let lo = Infinity;
  let hi = -Infinity;
  let sum = 0;
  for (let i = at; i < end; i++) {
    const v = data[i];
    if (v < lo) lo = v;
    if (v > hi) hi = v;
    sum += v;
  }
  if (hi - lo === 0) {
    // A constant block: the implicit zero point, and c = 7 steps of |c| / 7 either way.
    fit[0] = Math.fround(Math.abs(lo) / 7) || 1;
    fit[1] = 8;
    return;
  }
  let bestErr = Infinity;
  for (let start = 0; start < RANGE_SHRINKS.length; start++) {
    const shrink = RANGE_SHRINKS[start];
    let scale = Math.fround(((hi - lo) * shrink) / 15);
    let zero = clampLevel(Math.floor((-lo * shrink) / scale + 0.5));
    for (let refit = 0; refit <= REFITS; refit++) {
      const inv = 1 / scale;
      const offset = zero + 0.5;
      let err = 0;
      let sq = 0;
      let sqq = 0;
      let sxq = 0;
      for (let i = at; i < end; i++) {
        const v = data[i];
        // The level clamped to [0, 15] before truncating: floor's result there, in a fifth less time.
        const x = v * inv + offset;
        const q = x < 0 ? 0 : x >= 15 ? 15 : x | 0;
        const r = v - (q - zero) * scale;
        err += r * r;
        sq += q;
        sqq += q * q;
        sxq += v * q;
      }
      if (err < bestErr) {
        bestErr = err;
        fit[0] = scale;
        fit[1] = zero;
      }
      if (refit === REFITS) break;
      // x ~ a q + b by least squares over this rounding, then the zero point -b/a as an integer level
      // and the scale refitted for it: sum x (q - z) / sum (q - z)^2.
      const det = length * sqq - sq * sq;
      const a = det > 0 ? (length * sxq - sq * sum) / det : 0;
      if (!(a > 0)) break;
      zero = clampLevel(Math.floor(-(sum - a * sq) / length / a + 0.5));
      const den = sqq - 2 * zero * sq + length * zero * zero;
      const next = den > 0 ? Math.fround((sxq - zero * sum) / den) : 0;
      if (!(next > 0)) break;
      scale = next;
    }
  }
}

/** An int4 level clamped to [0, 15]. */
const clampLevel = (q: number) => (q < 0 ? 0 : q > 15 ? 15 : q);

/**
 * Per-block quantization of a weight in the checkpoint's [out, in] = [N, K] layout, which is
 * MatMulNBits' own. Symmetric: each block gets scale max|w| / qmax and levels round(w / scale) about
 * the implicit zero point 2^(bits-1). Asymmetric (int4 only): each block's scale and zero point from
 * asymmetricFit. int4 levels are packed two a byte, low nibble first.
 */
export function quantize(
  w: Tensor,
  layout: NbitsLayout,
  convert: ConvertSlices = convertInline,
): PackedWeight {
  const [n, k] = w.shape;
  const job: SliceJob = { kind: "nbits", layout };
  const sizes = convertedSizes(job, k, n);
  const out = {
    bytes: new Uint8Array(sizes.bytes),
    scales: new Float32Array(sizes.scales),
    zeros: layout.zeroPoints ? new Uint8Array(sizes.zeros) : undefined,
  };
  convert(w, job, out);
  return {
    n,
    k,
    ...layout,
    packed: out.bytes,
    scales: out.scales,
    ...(out.zeros ? { zeros: out.zeros } : {}),
  };
}

/** Rows `data` ([rows, K], the slice's own) to MatMulNBits blocks in `out`, from its start. */
function nbitsSlice(layout: NbitsLayout, k: number, data: Float32Array, out: Converted): void {
  const { bits, block } = layout;
  const blocks = k / block;
  const qmax = bits === 4 ? 7 : 127;
  const implicit = 1 << (bits - 1);
  const top = (1 << bits) - 1;
  const blob = (block * bits) / 8;
  const { bytes: packed, scales } = out;
  const zeros = layout.zeroPoints ? out.zeros! : null;
  const fit = new Float64Array(2);
  for (let i = 0; i < data.length / block; i++) {
    const at = i * block;
    let scale: number;
    let zero = implicit;
    if (zeros) {
      asymmetricFit(data, at, block, fit);
      [scale, zero] = [fit[0], fit[1]];
      zeros[zeroPointByte(i, blocks)] |= zero << zeroPointShift(i, blocks);
    } else {
      scale = symmetricScale(data, at, block, qmax);
    }
    scales[i] = scale;
    const o = i * blob;
    const offset = zero + 0.5;
    for (let j = 0; j < block; j++) {
      // round(w / scale) + zero, clamped to the levels, then truncated: Math.round's and floor's
      // result there, several times faster in V8.
      const x = data[at + j] / scale + offset;
      const level = x < 0 ? 0 : x >= top ? top : x | 0;
      if (bits === 8) packed[o + j] = level;
      else packed[o + (j >> 1)] |= j & 1 ? level << 4 : level;
    }
  }
}

/** fp32 values a slice of a weight holds (16 MB): the unit a conversion walks and a helper thread takes. */
export const SLICE_ELEMS = 4 << 20;

/**
 * Whether the options quantize a weight of more than one slice, whose slices helper threads can share
 * (onnx/convert_pool.ts): the head, or an FFN, of more than 4M weights.
 */
export function quantizesWide(cfg: ModelConfig, g: GraphOptions): boolean {
  if (g.quantize === "none") return false;
  const widths = cfg.layers.map((l) => (l.ffn.kind === "swiglu" ? l.ffn.intermediate : 0));
  return Math.max(cfg.vocabSize, ...widths) * cfg.hidden > SLICE_ELEMS;
}

/** Rows of a [N, K] weight in a slice. */
export const sliceRows = (k: number) => Math.max(1, Math.floor(SLICE_ELEMS / k));

/**
 * A conversion that goes a slice of rows at a time, each slice's output its rows' alone: MatMulNBits'
 * blocks (`quantize`), the integer path's int8 columns (`quantizeColumns`), an int8 table's rows
 * (`quantizeRows`).
 */
export type SliceJob =
  | { kind: "nbits"; layout: NbitsLayout }
  | { kind: "columns"; q: Exclude<Quantization, "none">; block: number }
  | { kind: "rows" };

/** What a conversion makes: its levels, its scales and (asymmetric int4) its zero points. */
export interface Converted {
  bytes: Uint8Array | Int8Array;
  scales: Float32Array;
  zeros?: Uint8Array;
}

/**
 * Converts every slice of a [N, K] weight into `out` (sized by convertedSizes for N rows): here, a
 * slice after another (convertInline), or on helper threads (onnx/convert_pool.ts).
 */
export type ConvertSlices = (t: Tensor, job: SliceJob, out: Converted) => void;

/** Lengths of what `rows` rows of a [*, K] weight convert to. */
export function convertedSizes(
  job: SliceJob,
  k: number,
  rows: number,
): { bytes: number; scales: number; zeros: number } {
  switch (job.kind) {
    case "nbits": {
      const { bits, block, zeroPoints } = job.layout;
      const blocks = k / block;
      return {
        bytes: (rows * blocks * block * bits) / 8,
        scales: rows * blocks,
        zeros: zeroPoints ? rows * zeroPointBytes(blocks) : 0,
      };
    }
    case "columns":
      return { bytes: rows * k, scales: (rows * k) / job.block, zeros: 0 };
    case "rows":
      return { bytes: rows * k, scales: rows, zeros: 0 };
  }
}

/**
 * Where a slice's output goes. The integer path's outputs are [K, N] (its weight transposed): the
 * slice's rows are columns `column` onward of rows `stride` wide. Other outputs start at `out`'s start.
 */
export interface SliceTarget {
  out: Converted;
  column: number;
  stride: number;
}

/**
 * Converts one slice, rows `data` ([rows, K]), into `target`. An int4 weight on the integer path is
 * first rounded to its MatMulNBits blocks and back, into `scratch` where given, else over `data`.
 */
export function convertSlice(
  job: SliceJob,
  k: number,
  data: Float32Array,
  target: SliceTarget,
  scratch?: Float32Array,
): void {
  switch (job.kind) {
    case "nbits":
      return nbitsSlice(job.layout, k, data, target.out);
    case "columns": {
      const values = job.q === "int4" ? int4RoundTrip(data, scratch ?? data) : data;
      return columnsSlice(job.block, k, values, target);
    }
    case "rows":
      return rowsSlice(k, data, target.out);
  }
}

/** The slice of rows [from, to) of a conversion's output laid out a row after another. */
function rowsOf(job: SliceJob, k: number, from: number, to: number, out: Converted): Converted {
  const at = convertedSizes(job, k, from);
  const length = convertedSizes(job, k, to - from);
  return {
    bytes: out.bytes.subarray(at.bytes, at.bytes + length.bytes),
    scales: out.scales.subarray(at.scales, at.scales + length.scales),
    ...(out.zeros ? { zeros: out.zeros.subarray(at.zeros, at.zeros + length.zeros) } : {}),
  };
}

/** A conversion's slices one after another, in this thread. */
export const convertInline: ConvertSlices = (t, job, out) => {
  const [n, k] = t.shape;
  let scratch: Float32Array | undefined;
  eachRowSlice(t, (from, to, data) => {
    // The first slice is the largest. The slice may be a decoded tensor's own data: never overwritten.
    if (job.kind === "columns" && job.q === "int4") scratch ??= new Float32Array(data.length);
    const target = job.kind === "columns"
      ? { out, column: from, stride: n }
      : { out: rowsOf(job, k, from, to, out), column: 0, stride: to - from };
    convertSlice(job, k, data, target, scratch?.subarray(0, data.length));
  });
};

/**
 * Copies the output of rows [from, to) that a helper converted into `local` (a SliceTarget at column
 * 0, `to - from` wide) to where convertInline would have written it in `out`.
 */
export function placeSlice(
  job: SliceJob,
  shape: readonly number[],
  from: number,
  to: number,
  local: Converted,
  out: Converted,
): void {
  const [n, k] = shape;
  const rows = to - from;
  if (job.kind === "columns") {
    for (let i = 0; i < k; i++) out.bytes.set(local.bytes.subarray(i * rows, (i + 1) * rows), i * n + from);
    for (let b = 0; b < k / job.block; b++) {
      out.scales.set(local.scales.subarray(b * rows, (b + 1) * rows), b * n + from);
    }
    return;
  }
  const at = rowsOf(job, k, from, to, out);
  at.bytes.set(local.bytes.subarray(0, at.bytes.length));
  at.scales.set(local.scales.subarray(0, at.scales.length));
  if (at.zeros) at.zeros.set(local.zeros!.subarray(0, at.zeros.length));
}

/** Bytes of int32 block sums a row of activations may produce on the integer path. */
const BLOCK_SUMS_BYTES = 4 << 20;

/**
 * The block along K of the integer path (activations and weights) for a [N, K] weight: 32, the block
 * whose activation rounding costs what native onnxruntime's int8 compute does (tiny-nas' KL to fp32
 * 0.0003; one scale a row: 0.0015), doubled while a row's int32 sums (K / block x N of them) would pass
 * 4 MB: a 128K-vocabulary head at batch 8 would otherwise hold 256 MB of them on a 4 GiB heap.
 */
export function integerBlock(n: number, k: number): number {
  let block = 32;
  while ((k / block) * n * 4 > BLOCK_SUMS_BYTES && k % (block * 2) === 0) block *= 2;
  return block;
}

/** Output columns quantizeColumns takes at a time: their int8 rows land in whole cache lines of [K, N]. */
const COLUMN_TILE = 64;

/**
 * A [N, K] weight for MatMulInteger: transposed to [K, N] int8, symmetric per output column and block
 * of `block` along K (scale max|w| / 127, [K / block, N] of them). int4 weights are first rounded to
 * their MatMulNBits blocks and back, so that an int4 model computes on WASM's integer kernel with int4's
 * values (at int8's size in memory).
 */
export function quantizeColumns(
  w: Tensor,
  q: Exclude<Quantization, "none">,
  block: number,
  convert: ConvertSlices = convertInline,
): { q: Int8Array; scales: Float32Array } {
  const [n, k] = w.shape;
  const out = { bytes: new Int8Array(n * k), scales: new Float32Array((k / block) * n) };
  convert(w, { kind: "columns", q, block }, out);
  return { q: out.bytes, scales: out.scales };
}

/** A slice's rows (values [rows, K]) to int8 columns of `target`, a tile of columns at a time. */
function columnsSlice(block: number, k: number, values: Float32Array, target: SliceTarget): void {
  const { column, stride } = target;
  const out = target.out.bytes;
  const scales = target.out.scales;
  const count = values.length / k;
  for (let row0 = 0; row0 < count; row0 += COLUMN_TILE) {
    const rows = Math.min(COLUMN_TILE, count - row0);
    const at = row0 * k;
    const col = column + row0;
    for (let b = 0; b < k / block; b++) {
      for (let r = 0; r < rows; r++) {
        scales[b * stride + col + r] = symmetricScale(values, at + r * k + b * block, block, 127);
      }
      for (let i = b * block; i < (b + 1) * block; i++) {
        for (let r = 0; r < rows; r++) {
          out[i * stride + col + r] = Math.floor(values[at + r * k + i] / scales[b * stride + col + r] + 0.5);
        }
      }
    }
  }
}

/**
 * The float weights quantizeColumns' weight stands for, in the checkpoint's [N, K] layout: the same
 * scales and rounding, without the int8 copy and its transpose.
 */
export function roundTripColumns(w: Tensor, q: Exclude<Quantization, "none">, block: number): Tensor {
  const [n, k] = w.shape;
  const out = new Float32Array(n * k);
  eachRowSlice(w, (from, _to, slice) => {
    const offset = from * k;
    const data = q === "int4" ? int4RoundTrip(slice, out.subarray(offset, offset + slice.length)) : slice;
    for (let at = 0; at < data.length; at += block) {
      const scale = symmetricScale(data, at, block, 127);
      for (let i = at; i < at + block; i++) out[offset + i] = Math.floor(data[i] / scale + 0.5) * scale;
    }
  });
  return { shape: [n, k], data: out };
}

/**
 * Values rounded to int4 MatMulNBits blocks (symmetric32(4)) and back into `into` (which may be
 * `data`), as `roundTrip` would the whole weight: what the integer path quantizes for an int4 model.
 */
function int4RoundTrip(data: Float32Array, into: Float32Array): Float32Array {
  for (let at = 0; at < data.length; at += BLOCK) {
    const scale = symmetricScale(data, at, BLOCK, 7);
    for (let i = at; i < at + BLOCK; i++) {
      const level = Math.floor(data[i] / scale + 0.5);
      into[i] = (level < -8 ? -8 : level > 7 ? 7 : level) * scale;
    }
  }
  return into;
}

/** The float weights `quantize(w, layout)` stands for: dequantize of it. */
export function roundTrip(w: Tensor, layout: NbitsLayout): Tensor {
  return dequantize(quantize(w, layout));
}

/** The float weights a packed weight stands for: what the quantized graph computes with. */
export function dequantize(p: PackedWeight): Tensor {
  const blocks = p.k / p.block;
  const blob = (p.block * p.bits) / 8;
  const data = new Float32Array(p.n * p.k);
  for (let i = 0; i < p.n * blocks; i++) {
    const scale = p.scales[i];
    const zero = p.zeros
      ? (p.zeros[zeroPointByte(i, blocks)] >> zeroPointShift(i, blocks)) & 15
      : 1 << (p.bits - 1);
    const at = i * blob;
    for (let j = 0; j < p.block; j++) {
      const q = p.bits === 8 ? p.packed[at + j] : (p.packed[at + (j >> 1)] >> (j & 1 ? 4 : 0)) & 15;
      data[i * p.block + j] = (q - zero) * scale;
    }
  }
  return { shape: [p.n, p.k], data };
}

/**
 * Bytes a [N, K] weight takes in the graph in a weight format: per block with scales in the float type
 * and any zero points (MatMulNBits), or one int8 a weight and a float scale a column and block (the
 * integer path, int4 too).
 */
export function weightBytes(n: number, k: number, g: GraphOptions): number {
  const f = g.dtype === "fp16" ? 2 : 4;
  const layout = nbitsLayout(k, g);
  if (!layout) return n * k * f;
  if (g.integer) return n * k + (k / integerBlock(n, k)) * n * 4;
  const blocks = k / layout.block;
  return (n * k * layout.bits) / 8 + n * blocks * f + (layout.zeroPoints ? n * zeroPointBytes(blocks) : 0);
}

/** A weight as a quantized graph computes with it: per block (MatMulNBits) or per column (integer GEMMs). */
function dequantized(w: Tensor, g: GraphOptions): Tensor {
  const layout = nbitsLayout(w.shape[1], g);
  if (!layout || g.quantize === "none") return w;
  if (!g.integer) return roundTrip(w, layout);
  return roundTripColumns(w, g.quantize, integerBlock(w.shape[0], w.shape[1]));
}

/** The blocks with every weight the graph would quantize replaced by its dequantized form. */
function dequantizedBlocks(blocks: Block[], g: GraphOptions): Block[] {
  const dq = (w: Tensor) => dequantized(w, g);
  const ffn = (b: FfnBlock): FfnBlock => ({ ...b, gate: dq(b.gate), up: dq(b.up), down: dq(b.down) });
  const each = (b: Block): Block => {
    switch (b.kind) {
      case "attention": {
        const { q: wq, k, v, o } = b.weights;
        return { ...b, weights: { ...b.weights, q: dq(wq), k: dq(k), v: dq(v), o: dq(o) } };
      }
      case "linear":
        return { ...b, weights: { ...b.weights, weight: dq(b.weights.weight) } };
      case "ffn":
        return ffn(b);
      case "parallel_ffn":
        return { ...b, members: b.members.map(ffn) };
      case "parallel_blocks":
        return { ...b, members: b.members.map((m) => m.map(each)) };
    }
  };
  return blocks.map(each);
}

/** An embedding table in int8, symmetric per row (one token's vector): an int8 embedding's Gather. */
export function quantizeRows(
  t: Tensor,
  convert: ConvertSlices = convertInline,
): { q: Int8Array; scales: Float32Array } {
  const [rows, d] = t.shape;
  const out = { bytes: new Int8Array(rows * d), scales: new Float32Array(rows) };
  convert(t, { kind: "rows" }, out);
  return { q: out.bytes, scales: out.scales };
}

/** A slice's rows (data [rows, d]) to int8, a scale a row, into `out` from its start. */
function rowsSlice(d: number, data: Float32Array, out: Converted): void {
  for (let r = 0; r < data.length / d; r++) {
    const at = r * d;
    const scale = symmetricScale(data, at, d, 127);
    out.scales[r] = scale;
    for (let i = at; i < at + d; i++) out.bytes[i] = Math.floor(data[i] / scale + 0.5);
  }
}

/**
 * Walks a [N, K] weight a slice of rows at a time, 16 MB of fp32 a slice (`data` holds rows
 * [from, to) until `f` returns), so a tied 128K-vocabulary table (1.05 GB in fp32) is quantized without
 * being decoded whole; a file-backed weight's slices are decoded into one buffer.
 */
function eachRowSlice(t: Tensor, f: (from: number, to: number, data: Float32Array) => void): void {
  const [n, k] = t.shape;
  const slice = sliceRows(k);
  // Not touched where the weight is in memory already (tensorRows then returns its rows).
  const buffer = new Float32Array(Math.min(n, slice) * k);
  for (let from = 0; from < n; from += slice) {
    const to = Math.min(n, from + slice);
    f(from, to, tensorRows(t, from, to, buffer));
  }
}

/** The embedding as an int8 embedding (embedsInt8) computes with it. */
function dequantizedEmbedding(t: Tensor): Tensor {
  const { q, scales } = quantizeRows(t);
  const d = t.shape[1];
  const data = new Float32Array(q.length);
  for (let row = 0; row < scales.length; row++) {
    const scale = scales[row];
    for (let i = row * d; i < (row + 1) * d; i++) data[i] = q[i] * scale;
  }
  return { shape: t.shape, data };
}

/**
 * A model's weights as a graph in these options computes with them (blocks after fusion, as the graph
 * takes them): the float64 reference of this is what a quantized session must reproduce, up to the
 * activations' rounding where the compute is int8 (GraphOptions.integer and accuracy 4).
 */
export function dequantizedModel<C extends { embed: Tensor; lmHead: Tensor }>(
  checkpoint: C,
  blocks: Block[],
  g: GraphOptions,
): { checkpoint: C; blocks: Block[] } {
  if (g.quantize === "none") return { checkpoint, blocks };
  return {
    checkpoint: {
      ...checkpoint,
      embed: embedsInt8(g) ? dequantizedEmbedding(checkpoint.embed) : checkpoint.embed,
      lmHead: dequantized(checkpoint.lmHead, g),
    },
    blocks: dequantizedBlocks(blocks, g),
  };
}
