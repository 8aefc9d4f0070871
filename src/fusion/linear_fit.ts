import type { AttentionWeights, LinearWeights } from "../model/checkpoint.ts";
import { type Block, unfusedBlocks } from "../model/blocks.ts";
import type { Checkpoint } from "../model/checkpoint.ts";
import { referenceForward, rmsNorm } from "../model/forward.ts";
import { lazyTensor, tensor } from "../model/tensor.ts";
import { dot } from "../numeric.ts";

/**
 * Relative ridge: lambda = RIDGE x mean(diag(H^T H)). Small enough that an exactly linear target is
 * recovered to 1e-6, large enough to keep the solve defined when calibration rows are fewer than the
 * hidden width.
 */
export const RIDGE = 1e-9;

/** Rows of inputs and targets gathered for one fit: n rows of dIn and dOut values, row-major. */
export interface FitData {
  n: number;
  dIn: number;
  dOut: number;
  h: Float64Array;
  y: Float64Array;
}

/** Rows NormalEquations.add takes at a time. */
const ROW_BLOCK = 64;

/**
 * The normal equations of a least-squares fit of dOut targets on dIn inputs, accumulated in float64
 * over batches of rows (memory O(dIn^2 + dIn dOut), whatever the number of rows): the Gram matrix
 * H^T H (upper triangle), the cross products H^T Y, and sum ||y||^2 for residuals.
 */
export class NormalEquations {
  readonly gram: Float64Array;
  readonly cross: Float64Array;
  targetSquares = 0;
  rows = 0;

  constructor(readonly dIn: number, readonly dOut: number) {
    this.gram = new Float64Array(dIn * dIn);
    this.cross = new Float64Array(dIn * dOut);
  }

  /** Adds n rows: h [n, dIn] and y [n, dOut], row-major. */
  add(n: number, h: Float64Array, y: Float64Array): void {
    this.targetSquares += this.accumulate(n, h, y, this.gram, this.cross);
    this.rows += n;
  }

  /**
   * Adds the statistics of n rows computed elsewhere (a window's H^T H as a full square, H^T Y and sum
   * ||y||^2, in fp32 from onnxruntime): the sums across windows are still float64.
   */
  addStatistics(n: number, gram: Float32Array, cross: Float32Array, squares: number): void {
    const { dIn } = this;
    for (let i = 0; i < dIn; i++) {
      const row = i * dIn;
      for (let j = i; j < dIn; j++) this.gram[row + j] += gram[row + j];
    }
    for (let k = 0; k < cross.length; k++) this.cross[k] += cross[k];
    this.targetSquares += squares;
    this.rows += n;
  }

  /** mean(diag(H^T H)): the scale a relative ridge is taken against. */
  get meanDiagonal(): number {
    let trace = 0;
    for (let i = 0; i < this.dIn; i++) trace += this.gram[i * this.dIn + i];
    return trace / this.dIn || 1;
  }

  /**
   * sum ||W h - y||^2 over the accumulated rows for W [dOut, dIn], from the statistics alone:
   * sum ||y||^2 - 2 tr(W H^T Y) + tr(W H^T H W^T).
   */
  residual(w: Float64Array): number {
    const { dIn, dOut, gram: a, cross: b } = this;
    let cross = 0;
    let quad = 0;
    for (let o = 0; o < dOut; o++) {
      const wo = o * dIn;
      for (let i = 0; i < dIn; i++) {
        const wi = w[wo + i];
        // Zero weights add nothing: a fit's "before" is the zero correction, whose residual is sum ||y||^2.
        if (wi === 0) continue;
        cross += wi * b[i * dOut + o];
        // w_o^T (H^T H) w_o from the upper triangle alone, the diagonal once and each pair above it twice,
        // as one contiguous dot per row: picking each entry from either triangle strides across memory.
        quad += wi * (a[i * dIn + i] * wi + 2 * dot(a, i * dIn + i + 1, w, wo + i + 1, dIn - i - 1));
      }
    }
    return this.targetSquares - 2 * cross + quad;
  }

  /**
   * The ridge solution W [dOut, dIn] minimising ||H W^T - Y||^2 + lambda ||W||^2 with lambda =
   * ridge x mean(diag(H^T H)): (H^T H + lambda I) W^T = H^T Y by Cholesky, in float64.
   */
  solve(ridge: number): Float64Array {
    return this.factor(ridge).solve(this.cross);
  }

  /**
   * The Cholesky factor of H^T H + lambda I, to solve for several right-hand sides H^T Y: Gauss-Newton
   * steps change the targets and keep the inputs, and the factorisation is the cubic part.
   */
  factor(ridge: number): CholeskyFactor {
    return new CholeskyFactor(this.gram, this.dIn, ridge * this.meanDiagonal);
  }

  /** H^T Y [dIn, dOut] of rows h [n, dIn], y [n, dOut]: a new right-hand side for the same Gram. */
  crossOf(
    n: number,
    h: Float64Array,
    y: Float64Array,
    into = new Float64Array(this.dIn * this.dOut),
  ): Float64Array {
    this.accumulate(n, h, y, null, into);
    return into;
  }

  /**
   * Adds H^T H of n rows to the upper triangle of `gram` (unless null) and H^T Y to `cross`; returns sum
   * ||y||^2. Rows are taken in blocks, transposed so that each entry gets a block's products as one
   * contiguous dot product: adding row by row rewrote the whole Gram (170 MB at width 4608) for every
   * token, which is bound by memory.
   */
  private accumulate(
    n: number,
    h: Float64Array,
    y: Float64Array,
    gram: Float64Array | null,
    cross: Float64Array,
  ): number {
    const { dIn, dOut } = this;
    const block = Math.min(ROW_BLOCK, n);
    const hT = new Float64Array(dIn * block);
    const yT = new Float64Array(dOut * block);
    const used = new Uint8Array(dIn);
    let squares = 0;
    for (let r0 = 0; r0 < n; r0 += block) {
      const m = Math.min(block, n - r0);
      used.fill(0);
      for (let r = 0; r < m; r++) {
        const hr = (r0 + r) * dIn;
        for (let i = 0; i < dIn; i++) {
          const v = h[hr + i];
          hT[i * m + r] = v;
          if (v !== 0) used[i] = 1;
        }
        const yr = (r0 + r) * dOut;
        for (let o = 0; o < dOut; o++) {
          const v = y[yr + o];
          yT[o * m + r] = v;
          squares += v * v;
        }
      }
      for (let i = 0; i < dIn; i++) {
        // Columns that are zero throughout the block (units a block group's member does not have) add nothing.
        if (!used[i]) continue;
        const ii = i * m;
        if (gram) {
          const ai = i * dIn;
          for (let j = i; j < dIn; j++) if (used[j]) gram[ai + j] += dot(hT, ii, hT, j * m, m);
        }
        const bi = i * dOut;
        for (let o = 0; o < dOut; o++) cross[bi + o] += dot(hT, ii, yT, o * m, m);
      }
    }
    return squares;
  }
}

/** A = L L^T of a symmetric positive definite matrix given by its upper triangle, with lambda on the diagonal. */
export class CholeskyFactor {
  private readonly l: Float64Array;

  constructor(upper: Float64Array, readonly n: number, lambda: number) {
    const a = Float64Array.from(upper);
    for (let i = 0; i < n; i++) {
      a[i * n + i] += lambda;
      for (let j = 0; j < i; j++) a[i * n + j] = a[j * n + i];
    }
    // In place, lower triangle.
    for (let j = 0; j < n; j++) {
      const d = a[j * n + j] - dot(a, j * n, a, j * n, j);
      if (!(d > 0)) throw new Error("ridge fit: the normal equations are not positive definite");
      const ljj = Math.sqrt(d);
      a[j * n + j] = ljj;
      const jj = j * n;
      let i = j + 1;
      // Four rows at a time against row j, which is read once for the four instead of four times.
      for (; i + 3 < n; i += 4) {
        const i0 = i * n;
        const i1 = i0 + n;
        const i2 = i1 + n;
        const i3 = i2 + n;
        let s0 = 0;
        let s1 = 0;
        let s2 = 0;
        let s3 = 0;
        for (let k = 0; k < j; k++) {
          const v = a[jj + k];
          s0 += a[i0 + k] * v;
          s1 += a[i1 + k] * v;
          s2 += a[i2 + k] * v;
          s3 += a[i3 + k] * v;
        }
        a[i0 + j] = (a[i0 + j] - s0) / ljj;
        a[i1 + j] = (a[i1 + j] - s1) / ljj;
        a[i2 + j] = (a[i2 + j] - s2) / ljj;
        a[i3 + j] = (a[i3 + j] - s3) / ljj;
      }
      for (; i < n; i++) a[i * n + j] = (a[i * n + j] - dot(a, i * n, a, jj, j)) / ljj;
    }
    this.l = a;
  }

  /** W [m, n] with A W^T = B for B [n, m] (every column at once, by forward then back substitution). */
  solve(rhs: Float64Array): Float64Array {
    const { n, l: a } = this;
    const m = rhs.length / n;
    const b = Float64Array.from(rhs);
    for (let i = 0; i < n; i++) {
      for (let k = 0; k < i; k++) {
        const l = a[i * n + k];
        for (let o = 0; o < m; o++) b[i * m + o] -= l * b[k * m + o];
      }
      const lii = a[i * n + i];
      for (let o = 0; o < m; o++) b[i * m + o] /= lii;
    }
    for (let i = n - 1; i >= 0; i--) {
      for (let k = i + 1; k < n; k++) {
        const l = a[k * n + i];
        for (let o = 0; o < m; o++) b[i * m + o] -= l * b[k * m + o];
      }
      const lii = a[i * n + i];
      for (let o = 0; o < m; o++) b[i * m + o] /= lii;
    }
    const w = new Float64Array(m * n);
    for (let i = 0; i < n; i++) for (let o = 0; o < m; o++) w[o * n + i] = b[i * m + o];
    return w;
  }
}

/**
 * Ridge least squares in closed form, float64: the W [dOut, dIn] minimising ||H W^T - Y||^2 +
 * lambda ||W||^2 (see NormalEquations.solve).
 */
export function ridgeFit({ n, dIn, dOut, h, y }: FitData, ridge = RIDGE): Float64Array {
  const eq = new NormalEquations(dIn, dOut);
  eq.add(n, h, y);
  return eq.solve(ridge);
}

/** Sum of squared residuals of H W^T against Y. */
export function residual({ n, dIn, dOut, h, y }: FitData, w: ArrayLike<number>): number {
  let sum = 0;
  for (let r = 0; r < n; r++) {
    for (let o = 0; o < dOut; o++) {
      let p = 0;
      for (let i = 0; i < dIn; i++) p += h[r * dIn + i] * w[o * dIn + i];
      sum += (p - y[r * dOut + o]) ** 2;
    }
  }
  return sum;
}

/**
 * The inputs and outputs of the attention sublayers of `layers` on calibration windows, as the
 * unfused model computes them: H = input_layernorm(x) (gain included) and Y = the attention's
 * contribution to the residual stream.
 */
export function attentionData(ckpt: Checkpoint, layers: number[], windows: number[][]): Map<number, FitData> {
  const blocks = unfusedBlocks(ckpt);
  const d = ckpt.config.hidden;
  const eps = ckpt.config.rmsEps;
  const rows = new Map<number, { h: Float64Array[]; y: Float64Array[] }>(
    layers.map((l) => [l, { h: [], y: [] }]),
  );
  const index = new Map<number, { layer: number; weights: AttentionWeights }>();
  blocks.forEach((b: Block, i) => {
    if (b.kind === "attention" && rows.has(b.layer)) index.set(i, b);
  });
  const last = Math.max(...index.keys());
  for (const ids of windows) {
    referenceForward(ckpt, blocks.slice(0, last + 1), ids, {
      logits: "none",
      onDelta: (i, delta, input) => {
        const b = index.get(i);
        if (!b) return;
        const r = rows.get(b.layer)!;
        r.h.push(rmsNorm(input, b.weights.norm, ids.length, d, eps));
        // The forward allocates every contribution afresh and never writes it again.
        r.y.push(delta);
      },
    });
  }
  const concat = (parts: Float64Array[]) => {
    const out = new Float64Array(parts.reduce((s, p) => s + p.length, 0));
    let at = 0;
    for (const p of parts) out.set(p, at), at += p.length;
    return out;
  };
  return new Map(
    [...rows].map(([l, r]) => {
      const h = concat(r.h);
      return [l, { n: h.length / d, dIn: d, dOut: d, h, y: concat(r.y) }];
    }),
  );
}

/**
 * DeciLM's `replace_with_linear` for each layer's attention, fitted to reproduce the attention it
 * replaces on the calibration windows: `y = W . input_layernorm(x)` with the layer's own norm gain.
 */
export function fitLinearAttention(
  ckpt: Checkpoint,
  layers: number[],
  windows: number[][],
): Map<number, LinearWeights> {
  const fits = new Map<number, LinearWeights>();
  if (layers.length === 0) return fits;
  const data = attentionData(ckpt, layers, windows);
  const d = ckpt.config.hidden;
  for (const layer of layers) {
    const attention = ckpt.layers[layer].attention as AttentionWeights;
    const w = ridgeFit(data.get(layer)!);
    fits.set(layer, { norm: attention.norm, weight: tensor([d, d], Float32Array.from(w)) });
  }
  return fits;
}

/** Calibration for the fits: the first 512 tokens of the text, in windows of up to 128. */
export const FIT_SLICE = { skip: 0, max: 512, window: 128 };

/**
 * The linear maps of a plan's `attention.linear` layers, fitted on first read of any of them (all in
 * one pass over the calibration windows): a swap that finds their converted weights cached never
 * fits again.
 */
export function lazyLinearAttention(
  ckpt: Checkpoint,
  layers: number[],
  windows: number[][],
): Map<number, LinearWeights> {
  let fitted: Map<number, LinearWeights> | null = null;
  const fit = () => (fitted ??= fitLinearAttention(ckpt, layers, windows));
  const d = ckpt.config.hidden;
  return new Map(layers.map((l) => [l, {
    norm: (ckpt.layers[l].attention as AttentionWeights).norm,
    weight: lazyTensor([d, d], () => fit().get(l)!.weight.data),
  }]));
}
