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
