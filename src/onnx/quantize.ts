import type { Block, FfnBlock } from "../model/blocks.ts";
import type { Tensor } from "../model/tensor.ts";
import type { GraphOptions, Quantization } from "./format.ts";

/** Weight-only quantization of the MatMul weights: none (the float type), or 8 / 4 bits a weight. */

/** Weights per scale: onnxruntime's MatMulNBits block, 32 along the input axis. */
export const BLOCK = 32;

export const BITS: Record<Exclude<Quantization, "none">, 4 | 8> = { int8: 8, int4: 4 };

/** A [N, K] weight in MatMulNBits' layout: B uint8 [N, K/32, 32 * bits / 8], one float scale a block. */
export interface PackedWeight {
  n: number;
  k: number;
  bits: 4 | 8;
  packed: Uint8Array;
  scales: Float32Array;
}

/** Symmetric scale of `length` values from `at`: max|x| / qmax (1 for an all-zero run). */
function symmetricScale(data: Float32Array, at: number, length: number, qmax: number): number {
  let amax = 0;
  for (let i = 0; i < length; i++) amax = Math.max(amax, Math.abs(data[at + i]));
  return Math.fround(amax / qmax) || 1;
}

/** MatMulNBits needs whole blocks along K; a weight with a ragged K stays in float. */
export function quantizable(w: Tensor): boolean {
  return w.shape.length === 2 && w.shape[1] % BLOCK === 0;
}

/**
 * Symmetric per-block quantization of a weight in the checkpoint's [out, in] = [N, K] layout, which
 * is MatMulNBits' own: each block of 32 inputs of one output gets scale max|w| / qmax, values
 * round(w / scale) stored with the implicit zero point 2^(bits-1) (8 for int4, low nibble first).
 */
export function quantize(w: Tensor, bits: 4 | 8): PackedWeight {
  const [n, k] = w.shape;
  const blocks = k / BLOCK;
  const qmax = bits === 4 ? 7 : 127;
  const zero = 1 << (bits - 1);
  const blob = (BLOCK * bits) / 8;
  const packed = new Uint8Array(n * blocks * blob);
  const scales = new Float32Array(n * blocks);
  const data = w.data;
  for (let row = 0; row < n; row++) {
    for (let b = 0; b < blocks; b++) {
      const base = row * k + b * BLOCK;
      const scale = symmetricScale(data, base, BLOCK, qmax);
      scales[row * blocks + b] = scale;
      const out = (row * blocks + b) * blob;
      for (let i = 0; i < BLOCK; i++) {
        const q = Math.max(-zero, Math.min(qmax, Math.round(data[base + i] / scale))) + zero;
        if (bits === 8) packed[out + i] = q;
        else packed[out + (i >> 1)] |= i & 1 ? q << 4 : q;
      }
    }
  }
  return { n, k, bits, packed, scales };
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
): { q: Int8Array; scales: Float32Array } {
  const src = q === "int4" ? roundTrip(w, 4) : w;
  const [n, k] = w.shape;
  const data = src.data;
  const out = new Int8Array(n * k);
  const scales = new Float32Array((k / block) * n);
  for (let row0 = 0; row0 < n; row0 += COLUMN_TILE) {
    const rows = Math.min(COLUMN_TILE, n - row0);
    for (let b = 0; b < k / block; b++) {
      for (let r = 0; r < rows; r++) {
        scales[b * n + row0 + r] = symmetricScale(data, (row0 + r) * k + b * block, block, 127);
      }
      for (let i = b * block; i < (b + 1) * block; i++) {
        for (let r = 0; r < rows; r++) {
          out[i * n + row0 + r] = Math.round(data[(row0 + r) * k + i] / scales[b * n + row0 + r]);
        }
      }
    }
  }
  return { q: out, scales };
}

/**
 * The float weights quantizeColumns' weight stands for, in the checkpoint's [N, K] layout: the same
 * scales and rounding, without the int8 copy and its transpose.
 */
export function roundTripColumns(w: Tensor, q: Exclude<Quantization, "none">, block: number): Tensor {
  const src = q === "int4" ? roundTrip(w, 4) : w;
  const [n, k] = w.shape;
  const data = src.data;
  const out = new Float32Array(n * k);
  for (let at = 0; at < n * k; at += block) {
    const scale = symmetricScale(data, at, block, 127);
    for (let i = at; i < at + block; i++) out[i] = Math.round(data[i] / scale) * scale;
  }
  return { shape: [n, k], data: out };
}

/** The float weights `quantize(w, bits)` stands for (dequantize of it), without packing them. */
export function roundTrip(w: Tensor, bits: 4 | 8): Tensor {
  const [n, k] = w.shape;
  const qmax = bits === 4 ? 7 : 127;
  const zero = 1 << (bits - 1);
  const data = w.data;
  const out = new Float32Array(n * k);
  for (let at = 0; at < n * k; at += BLOCK) {
    const scale = symmetricScale(data, at, BLOCK, qmax);
    for (let i = at; i < at + BLOCK; i++) {
      out[i] = Math.max(-zero, Math.min(qmax, Math.round(data[i] / scale))) * scale;
    }
  }
  return { shape: [n, k], data: out };
}

/** The float weights a packed weight stands for: what the quantized graph computes with. */
export function dequantize(p: PackedWeight): Tensor {
  const blocks = p.k / BLOCK;
  const blob = (BLOCK * p.bits) / 8;
  const zero = 1 << (p.bits - 1);
  const data = new Float32Array(p.n * p.k);
  for (let row = 0; row < p.n; row++) {
    for (let b = 0; b < blocks; b++) {
      const scale = p.scales[row * blocks + b];
      const at = (row * blocks + b) * blob;
      for (let i = 0; i < BLOCK; i++) {
        const q = p.bits === 8 ? p.packed[at + i] : (p.packed[at + (i >> 1)] >> (i & 1 ? 4 : 0)) & 15;
        data[row * p.k + b * BLOCK + i] = (q - zero) * scale;
      }
    }
  }
  return { shape: [p.n, p.k], data };
}

/**
 * Bytes a [N, K] weight takes in the graph in a weight format: per block of 32 with scales in the float
 * type (MatMulNBits), or one int8 a weight and a float scale a column (the integer path, int4 too).
 */
export function weightBytes(n: number, k: number, g: GraphOptions): number {
  const f = g.dtype === "fp16" ? 2 : 4;
  if (g.quantize === "none" || k % BLOCK !== 0) return n * k * f;
  if (g.integer) return n * k + (k / integerBlock(n, k)) * n * 4;
  return (n * k * BITS[g.quantize]) / 8 + (n * k / BLOCK) * f;
}

/** A weight as a quantized graph computes with it: per block (MatMulNBits) or per column (integer GEMMs). */
function dequantized(w: Tensor, q: Exclude<Quantization, "none">, integer: boolean): Tensor {
  if (!quantizable(w)) return w;
  if (!integer) return roundTrip(w, BITS[q]);
  return roundTripColumns(w, q, integerBlock(w.shape[0], w.shape[1]));
}

/** The blocks with every weight the graph would quantize replaced by its dequantized form. */
function dequantizedBlocks(blocks: Block[], q: Exclude<Quantization, "none">, integer: boolean): Block[] {
  const dq = (w: Tensor) => dequantized(w, q, integer);
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

/** An embedding table in int8, symmetric per row (one token's vector): the integer path's Gather. */
export function quantizeRows(t: Tensor): { q: Int8Array; scales: Float32Array } {
  const [rows, d] = t.shape;
  const data = t.data;
  const q = new Int8Array(rows * d);
  const scales = new Float32Array(rows);
  for (let r = 0; r < rows; r++) {
    const scale = symmetricScale(data, r * d, d, 127);
    scales[r] = scale;
    for (let i = 0; i < d; i++) q[r * d + i] = Math.round(data[r * d + i] / scale);
  }
  return { q, scales };
}

/** The embedding as the integer path computes with it. */
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
  const integer = g.integer ?? false;
  return {
    checkpoint: {
      ...checkpoint,
      embed: integer ? dequantizedEmbedding(checkpoint.embed) : checkpoint.embed,
      lmHead: dequantized(checkpoint.lmHead, g.quantize, integer),
    },
    blocks: dequantizedBlocks(blocks, g.quantize, integer),
  };
}
