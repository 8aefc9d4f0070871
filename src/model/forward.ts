import type { Block, FfnBlock } from "./blocks.ts";
import type { Checkpoint } from "./checkpoint.ts";
import { applyRope, ropeInvFreq } from "./rope.ts";
import type { Tensor } from "./tensor.ts";
import { dot } from "../numeric.ts";

/**
 * A plain float64 forward pass over a block list, on the CPU. It is the independent reference the
 * ONNX graph is tested against, and the instrument the fusion analysis uses: it can skip a block
 * and report every block's contribution `f_j(x) - x`.
 */

type Vecs = Float64Array; // [T, width] row-major

/** y[T, out] = x[T, in] @ W^T, W in [out, in] layout. */
export function linear(x: Vecs, w: Tensor, t: number): Vecs {
  const [out, inn] = w.shape;
  const y = new Float64Array(t * out);
  const wd = w.data;
  for (let r = 0; r < t; r++) {
    const xo = r * inn;
    for (let o = 0; o < out; o++) y[r * out + o] = dot(x, xo, wd, o * inn, inn);
  }
  return y;
}

/** RMSNorm of T rows of width d, with the gain when given. */
export function rmsNorm(x: Vecs, gain: Float32Array | null, t: number, d: number, eps: number): Vecs {
  const y = new Float64Array(t * d);
  for (let r = 0; r < t; r++) {
    let ss = 0;
    for (let i = 0; i < d; i++) ss += x[r * d + i] ** 2;
    const inv = 1 / Math.sqrt(ss / d + eps);
    for (let i = 0; i < d; i++) y[r * d + i] = x[r * d + i] * inv * (gain ? gain[i] : 1);
  }
  return y;
}

/** silu(gate h) * (up h), h = norm(x) with the block's gain: an FFN block's activations [T, width]. */
export function swigluActivations(
  x: Float64Array,
  b: FfnBlock,
  t: number,
  d: number,
  eps: number,
): Float64Array {
  const h = rmsNorm(x, b.norm, t, d, eps);
  const gate = linear(h, b.gate, t);
  const up = linear(h, b.up, t);
  for (let i = 0; i < gate.length; i++) gate[i] = (gate[i] / (1 + Math.exp(-gate[i]))) * up[i];
  return gate;
}

/** FFN_b(norm(x)) for T rows of width d, without the residual: the float64 reference of one FFN block. */
export function ffnDelta(x: Float64Array, b: FfnBlock, t: number, d: number, eps: number): Float64Array {
  return linear(swigluActivations(x, b, t, d, eps), b.down, t);
}

export interface ForwardOptions {
  /** Index into the block list of a block to leave out (the residual passes through unchanged). */
  skipBlock?: number;
  /** Resume at block `block` from its recorded input `x` [T, hidden] instead of the embeddings. */
  start?: { block: number; x: Float64Array };
  /** Called with each executed block's index, its input x and its contribution f(x) - x, [T, hidden]. */
  onDelta?: (block: number, delta: Float64Array, input: Float64Array) => void;
  /** Which logits to compute: all positions (default), the last one, or none (analysis passes). */
  logits?: "all" | "last" | "none";
}

export interface ForwardResult {
  /** [T or 1, vocab] */
  logits: Float64Array;
  /** Final residual stream before the last norm, [T, hidden]. */
  hidden: Float64Array;
}

export function referenceForward(
  ckpt: Pick<Checkpoint, "config" | "embed" | "finalNorm" | "lmHead">,
  blocks: Block[],
  ids: number[],
  opts: ForwardOptions = {},
): ForwardResult {
  const cfg = ckpt.config;
  const d = cfg.hidden;
  const t = ids.length;
  const hd = cfg.headDim;
  const eps = cfg.rmsEps;
  let x: Float64Array = new Float64Array(t * d);
  if (opts.start) x = opts.start.x;
  else {
    const embed = ckpt.embed.data;
    ids.forEach((id, r) => {
      for (let i = 0; i < d; i++) x[r * d + i] = embed[id * d + i];
    });
  }
  const inv = ropeInvFreq(cfg.rope, hd);
  const rope = (v: Vecs, heads: number) => applyRope(v, t, heads, hd, inv);

  const add = (a: Vecs, b: Vecs) => {
    const y = new Float64Array(a.length);
    for (let i = 0; i < y.length; i++) y[i] = a[i] + b[i];
    return y;
  };
  // f(x) - x of one block, read from the residual stream x [T, hidden].
  const deltaOf = (x: Vecs, b: Block): Vecs => {
    if (b.kind === "attention") {
      const H = cfg.numHeads;
      const kvH = b.kvHeads;
      const rep = H / kvH;
      const h = rmsNorm(x, b.weights.norm, t, d, eps);
      const q = linear(h, b.weights.q, t);
      const k = linear(h, b.weights.k, t);
      const v = linear(h, b.weights.v, t);
      rope(q, H);
      rope(k, kvH);
      const ctx = new Float64Array(t * H * hd);
      const scale = 1 / Math.sqrt(hd);
      const scores = new Float64Array(t);
      for (let head = 0; head < H; head++) {
        const kvHead = Math.floor(head / rep);
        for (let qi = 0; qi < t; qi++) {
          let max = -Infinity;
          for (let ki = 0; ki <= qi; ki++) {
            let s = 0;
            for (let i = 0; i < hd; i++) {
              s += q[qi * H * hd + head * hd + i] * k[ki * kvH * hd + kvHead * hd + i];
            }
            scores[ki] = s * scale;
            if (scores[ki] > max) max = scores[ki];
          }
          let sum = 0;
          for (let ki = 0; ki <= qi; ki++) sum += scores[ki] = Math.exp(scores[ki] - max);
          for (let ki = 0; ki <= qi; ki++) {
            const p = scores[ki] / sum;
            for (let i = 0; i < hd; i++) {
              ctx[qi * H * hd + head * hd + i] += p * v[ki * kvH * hd + kvHead * hd + i];
            }
          }
        }
      }
      return linear(ctx, b.weights.o, t);
    }
    if (b.kind === "linear") return linear(rmsNorm(x, b.weights.norm, t, d, eps), b.weights.weight, t);
    if (b.kind === "ffn") return ffnDelta(x, b, t, d, eps);
    const delta = new Float64Array(t * d);
    if (b.kind === "parallel_ffn") {
      for (const m of b.members) {
        const part = ffnDelta(x, m, t, d, eps);
        for (let i = 0; i < delta.length; i++) delta[i] += part[i];
      }
      return delta;
    }
    // Whole layers from the same input: each member runs its blocks in sequence, contributing y_m - x.
    for (const member of b.members) {
      let y = x;
      for (const mb of member) y = add(y, deltaOf(y, mb));
      for (let i = 0; i < delta.length; i++) delta[i] += y[i] - x[i];
    }
    return delta;
  };

  blocks.forEach((b, bi) => {
    if (bi === opts.skipBlock || bi < (opts.start?.block ?? 0)) return;
    const delta = deltaOf(x, b);
    opts.onDelta?.(bi, delta, x);
    x = add(x, delta);
  });

  const mode = opts.logits ?? "all";
  if (mode === "none") return { logits: new Float64Array(0), hidden: x };
  const rows = mode === "last" ? 1 : t;
  const tail = x.subarray((t - rows) * d);
  const h = rmsNorm(tail, ckpt.finalNorm, rows, d, eps);
  return { logits: linear(h, ckpt.lmHead, rows), hidden: x };
}
