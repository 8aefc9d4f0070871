import type { Block, FfnBlock } from "../model/blocks.ts";
import type { Tensor } from "../model/tensor.ts";
import type { GraphOptions } from "./format.ts";

/** Weight-only quantization of the MatMul weights: none (the float type), or 8 / 4 bits a weight. */
export type Quantization = "none" | "int8" | "int4";

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

/** MatMulNBits needs whole blocks along K; a weight with a ragged K stays in float. */
export function quantizable(w: Tensor): boolean {
  return w.shape.length === 2 && w.shape[1] % BLOCK === 0;
}

/**
 * Symmetric per-block quantization of a weight in the checkpoint's [out, in] = [N, K] layout, which
 * is MatMulNBits' own: each block of 32 inputs of one output gets scale max|w| / qmax, values
 * round(w / scale) stored with the implicit zero point 2^(bits-1) (8 for int4, low nibble first).
 */
export function quantize(
  w: Tensor,
  bits: 4 | 8,
  alloc: { u8(n: number): Uint8Array; f32(n: number): Float32Array } = {
    u8: (n) => new Uint8Array(n),
    f32: (n) => new Float32Array(n),
  },
): PackedWeight {
  const [n, k] = w.shape;
  const blocks = k / BLOCK;
  const qmax = bits === 4 ? 7 : 127;
  const zero = 1 << (bits - 1);
  const blob = (BLOCK * bits) / 8;
  const packed = alloc.u8(n * blocks * blob);
  const scales = alloc.f32(n * blocks);
  const data = w.data;
  for (let row = 0; row < n; row++) {
    for (let b = 0; b < blocks; b++) {
      const base = row * k + b * BLOCK;
      let amax = 0;
      for (let i = 0; i < BLOCK; i++) amax = Math.max(amax, Math.abs(data[base + i]));
      const scale = Math.fround(amax / qmax) || 1;
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

/** Bytes a [N, K] weight takes in the graph in a weight format (scales are in the float type). */
export function weightBytes(n: number, k: number, g: GraphOptions): number {
  const f = g.dtype === "fp16" ? 2 : 4;
  if (g.quantize === "none" || k % BLOCK !== 0) return n * k * f;
  return (n * k * BITS[g.quantize]) / 8 + (n * k / BLOCK) * f;
}

/**
 * The blocks with every weight the graph would quantize replaced by its dequantized form: the float64
 * reference of these is what a quantized session must reproduce (apply after fusion, as the graph does).
 */
export function dequantizedBlocks(blocks: Block[], q: Quantization): Block[] {
  if (q === "none") return blocks;
  const dq = (w: Tensor) => (quantizable(w) ? dequantize(quantize(w, BITS[q])) : w);
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

/** The LM head as the quantized graph computes with it. */
export function dequantizedHead(lmHead: Tensor, q: Quantization): Tensor {
  return q === "none" || !quantizable(lmHead) ? lmHead : dequantize(quantize(lmHead, BITS[q]));
}
