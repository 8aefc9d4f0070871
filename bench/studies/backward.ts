import type { Block, FfnBlock } from "../../src/model/blocks.ts";
import type { Checkpoint } from "../../src/model/checkpoint.ts";
import { linear, referenceForward, rmsNorm } from "../../src/model/forward.ts";
import { applyRope, ropeInvFreq } from "../../src/model/rope.ts";
import type { Tensor } from "../../src/model/tensor.ts";

/**
 * Vector-Jacobian products of the float64 reference forward (forward.ts): the gradient of a loss on
 * the logits with respect to the residual stream where a block list is entered: what fitting a fused
 * group against what the layers after it do with its output needs (bench/studies/heal_logits.ts measures
 * that objective). Weights are never differentiated here, only the stream.
 */

type Vecs = Float64Array; // [T, width] row-major

type Model = Pick<Checkpoint, "config" | "embed" | "finalNorm" | "lmHead">;

/** y[T, in] = g[T, out] @ W for W [out, in]: the input gradient of `linear`. */
export function linearBackward(g: Vecs, w: Tensor, t: number): Vecs {
  const [out, inn] = w.shape;
  const y = new Float64Array(t * inn);
  const wd = w.data;
  for (let r = 0; r < t; r++) {
    const yr = r * inn;
    for (let o = 0; o < out; o++) {
      const gv = g[r * out + o];
      if (gv === 0) continue;
      const wo = o * inn;
      for (let i = 0; i < inn; i++) y[yr + i] += gv * wd[wo + i];
    }
  }
  return y;
}

/** dx of y = rmsNorm(x, gain) given dy. */
export function rmsNormBackward(
  x: Vecs,
  gain: Float32Array | null,
  dy: Vecs,
  t: number,
  d: number,
  eps: number,
): Vecs {
  const dx = new Float64Array(t * d);
  for (let r = 0; r < t; r++) {
    const o = r * d;
    let ss = 0;
    let proj = 0;
    for (let i = 0; i < d; i++) {
      const gi = gain ? gain[i] : 1;
      ss += x[o + i] ** 2;
      proj += gi * dy[o + i] * x[o + i];
    }
    const inv = 1 / Math.sqrt(ss / d + eps);
    const k = (inv * inv * inv * proj) / d;
    for (let i = 0; i < d; i++) dx[o + i] = inv * (gain ? gain[i] : 1) * dy[o + i] - x[o + i] * k;
  }
  return dx;
}

function ffnBackward(x: Vecs, b: FfnBlock, g: Vecs, t: number, d: number, eps: number): Vecs {
  const h = rmsNorm(x, b.norm, t, d, eps);
  const gate = linear(h, b.gate, t);
  const up = linear(h, b.up, t);
  const da = linearBackward(g, b.down, t);
  const dGate = new Float64Array(gate.length);
  const dUp = new Float64Array(up.length);
  for (let i = 0; i < gate.length; i++) {
    const z = gate[i];
    const sig = 1 / (1 + Math.exp(-z));
    dUp[i] = da[i] * z * sig;
    dGate[i] = da[i] * up[i] * sig * (1 + z * (1 - sig));
  }
  const dh = linearBackward(dGate, b.gate, t);
  const dhUp = linearBackward(dUp, b.up, t);
  for (let i = 0; i < dh.length; i++) dh[i] += dhUp[i];
  return rmsNormBackward(x, b.norm, dh, t, d, eps);
}

/**
 * The gradient of the loss with respect to x through one block's contribution f(x) - x, given the
 * gradient `g` at its output (the residual's identity is added by the caller).
 */
function blockBackward(ckpt: Model, b: Block, ids: number[], x: Vecs, g: Vecs): Vecs {
  const cfg = ckpt.config;
  const d = cfg.hidden;
  const t = ids.length;
  const eps = cfg.rmsEps;
  if (b.kind === "ffn") return ffnBackward(x, b, g, t, d, eps);
  if (b.kind === "linear") {
    return rmsNormBackward(x, b.weights.norm, linearBackward(g, b.weights.weight, t), t, d, eps);
  }
  if (b.kind === "parallel_ffn") {
    const dx = new Float64Array(t * d);
    for (const m of b.members) {
      const part = ffnBackward(x, m, g, t, d, eps);
      for (let i = 0; i < dx.length; i++) dx[i] += part[i];
    }
    return dx;
  }
  if (b.kind === "parallel_blocks") {
    // delta = sum_m (y_m - x): each member's sequence backward from g, less the g its identity passes.
    const dx = new Float64Array(t * d);
    for (const member of b.members) {
      const part = sequenceBackward(ckpt, member, ids, x, g);
      for (let i = 0; i < dx.length; i++) dx[i] += part[i] - g[i];
    }
    return dx;
  }
  return attentionBackward(ckpt, b, t, x, g);
}

function attentionBackward(
  ckpt: Model,
  b: Extract<Block, { kind: "attention" }>,
  t: number,
  x: Vecs,
  g: Vecs,
): Vecs {
  const cfg = ckpt.config;
  const d = cfg.hidden;
  const hd = cfg.headDim;
  const eps = cfg.rmsEps;
  const H = cfg.numHeads;
  const kvH = b.kvHeads;
  const rep = H / kvH;
  const w = b.weights;
  const inv = ropeInvFreq(cfg.rope, hd);
  const h = rmsNorm(x, w.norm, t, d, eps);
  const q = linear(h, w.q, t);
  const k = linear(h, w.k, t);
  const v = linear(h, w.v, t);
  applyRope(q, t, H, hd, inv);
  applyRope(k, t, kvH, hd, inv);
  const dCtx = linearBackward(g, w.o, t);
  const dq = new Float64Array(q.length);
  const dk = new Float64Array(k.length);
  const dv = new Float64Array(v.length);
  const scale = 1 / Math.sqrt(hd);
  const p = new Float64Array(t);
  const dp = new Float64Array(t);
  const qw = H * hd;
  const kw = kvH * hd;
  for (let head = 0; head < H; head++) {
    const qo = head * hd;
    const ko = Math.floor(head / rep) * hd;
    for (let qi = 0; qi < t; qi++) {
      // The forward's softmax row, recomputed: storing T x T probabilities per head would cost more.
      let max = -Infinity;
      for (let ki = 0; ki <= qi; ki++) {
        let s = 0;
        for (let i = 0; i < hd; i++) s += q[qi * qw + qo + i] * k[ki * kw + ko + i];
        p[ki] = s * scale;
        if (p[ki] > max) max = p[ki];
      }
      let sum = 0;
      for (let ki = 0; ki <= qi; ki++) sum += p[ki] = Math.exp(p[ki] - max);
      let pdp = 0;
      for (let ki = 0; ki <= qi; ki++) {
        p[ki] /= sum;
        let s = 0;
        for (let i = 0; i < hd; i++) s += dCtx[qi * qw + qo + i] * v[ki * kw + ko + i];
        dp[ki] = s;
        pdp += p[ki] * s;
      }
      for (let ki = 0; ki <= qi; ki++) {
        const ds = p[ki] * (dp[ki] - pdp) * scale;
        for (let i = 0; i < hd; i++) {
          dq[qi * qw + qo + i] += ds * k[ki * kw + ko + i];
          dk[ki * kw + ko + i] += ds * q[qi * qw + qo + i];
          dv[ki * kw + ko + i] += p[ki] * dCtx[qi * qw + qo + i];
        }
      }
    }
  }
  applyRope(dq, t, H, hd, inv, true);
  applyRope(dk, t, kvH, hd, inv, true);
  const dh = linearBackward(dq, w.q, t);
  for (const [grad, weight] of [[dk, w.k], [dv, w.v]] as const) {
    const part = linearBackward(grad, weight, t);
    for (let i = 0; i < dh.length; i++) dh[i] += part[i];
  }
  return rmsNormBackward(x, w.norm, dh, t, d, eps);
}

/** dL/dx at the entry of a block sequence started from x, given dL/d(its output stream). */
function sequenceBackward(ckpt: Model, blocks: Block[], ids: number[], x: Vecs, gOut: Vecs): Vecs {
  const inputs: Vecs[] = [];
  referenceForward(ckpt, blocks, ids, {
    start: { block: 0, x },
    logits: "none",
    onDelta: (i, _delta, input) => (inputs[i] = input),
  });
  return backThrough(ckpt, blocks, ids, inputs, gOut);
}

/** Backward through blocks whose inputs the forward recorded, last to first, each adding its residual. */
function backThrough(ckpt: Model, blocks: Block[], ids: number[], inputs: Vecs[], gOut: Vecs): Vecs {
  let g = gOut;
  for (let i = blocks.length - 1; i >= 0; i--) {
    const part = blockBackward(ckpt, blocks[i], ids, inputs[i], g);
    g = Float64Array.from(g, (v, j) => v + part[j]);
  }
  return g;
}

/**
 * The forward from block `start` (stream `x` entering it) to the logits of every position, and the
 * gradient of a loss on those logits with respect to `x`: `lossGrad` takes the logits [T, vocab] and
 * returns dL/dlogits.
 */
export function streamGradient(
  ckpt: Model,
  blocks: Block[],
  ids: number[],
  start: { block: number; x: Vecs },
  lossGrad: (logits: Vecs) => Vecs,
): Vecs {
  const cfg = ckpt.config;
  const t = ids.length;
  const tail = blocks.slice(start.block);
  const inputs: Vecs[] = [];
  const { logits, hidden } = referenceForward(ckpt, tail, ids, {
    start: { block: 0, x: start.x },
    onDelta: (i, _delta, input) => (inputs[i] = input),
  });
  const dh = linearBackward(lossGrad(logits), ckpt.lmHead, t);
  const gOut = rmsNormBackward(hidden, ckpt.finalNorm, dh, t, cfg.hidden, cfg.rmsEps);
  return backThrough(ckpt, tail, ids, inputs, gOut);
}
