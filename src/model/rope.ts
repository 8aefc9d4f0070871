import type { RopeSpec } from "./config.ts";

/** Per-pair rotation frequencies (length headDim/2), with the checkpoint's scaling rule applied. */
export function ropeInvFreq(rope: RopeSpec, headDim: number): Float64Array {
  const half = headDim / 2;
  const inv = new Float64Array(half);
  for (let i = 0; i < half; i++) inv[i] = 1 / rope.theta ** ((2 * i) / headDim);
  const s = rope.scaling;
  if (s.kind === "linear") return inv.map((f) => f / s.factor);
  if (s.kind === "llama3") {
    const lowWavelen = s.originalMaxPositions / s.lowFreqFactor;
    const highWavelen = s.originalMaxPositions / s.highFreqFactor;
    return inv.map((f) => {
      const wavelen = (2 * Math.PI) / f;
      if (wavelen < highWavelen) return f;
      if (wavelen > lowWavelen) return f / s.factor;
      const smooth = (s.originalMaxPositions / wavelen - s.lowFreqFactor) /
        (s.highFreqFactor - s.lowFreqFactor);
      return (1 - smooth) * (f / s.factor) + smooth * f;
    });
  }
  return inv;
}

/**
 * Rotates T rows of `heads` heads of width headDim in place, row r at position r. `inverse` applies the
 * transposed rotation, which is what a vector-Jacobian product through RoPE needs.
 */
export function applyRope(
  v: Float64Array,
  t: number,
  heads: number,
  headDim: number,
  inv: Float64Array,
  inverse = false,
): void {
  const half = headDim / 2;
  const sign = inverse ? -1 : 1;
  for (let r = 0; r < t; r++) {
    for (let h = 0; h < heads; h++) {
      const base = r * heads * headDim + h * headDim;
      for (let i = 0; i < half; i++) {
        const a = r * inv[i];
        const c = Math.cos(a);
        const s = sign * Math.sin(a);
        const x1 = v[base + i];
        const x2 = v[base + half + i];
        v[base + i] = x1 * c - x2 * s;
        v[base + half + i] = x2 * c + x1 * s;
      }
    }
  }
}
