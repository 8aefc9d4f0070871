/** mulberry32: small, fast, and reproducible across runs for a given seed. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Index of the largest value (the first one on ties). */
export function argmax(row: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
  return best;
}

/** 2^-i for i in [0, 1074]: the integer part of expNonPositive's power of two, down to the last subnormal. */
const NEGATIVE_POWERS_OF_TWO = Float64Array.from({ length: 1075 }, (_, i) => 2 ** -i);
/** Added and subtracted, rounds a double of magnitude below 2^51 to an integer (ties to even). */
const ROUNDER = 6755399441055744;

/**
 * e^x for x <= 0 within 2e-7 relative (0 below -744): 2^(x log2 e) split into an integer power, read
 * from a table, and a remainder in [-1/2, 1/2], whose 2^r is a degree-6 polynomial. It exists for
 * sampling over a vocabulary: V8's Math.exp took ~9 ns a call, 1.2 ms a 128K-vocabulary row, and this
 * takes half that; no caller needs more digits than a float32 holds.
 */
export function expNonPositive(x: number): number {
  const y = x * Math.LOG2E;
  if (y < -1074) return 0;
  const n = (y + ROUNDER) - ROUNDER;
  const z = (y - n) * Math.LN2;
  const poly = 1 + z * (1 + z * (1 / 2 + z * (1 / 6 + z * (1 / 24 + z * (1 / 120 + z / 720)))));
  return poly * NEGATIVE_POWERS_OF_TWO[-n | 0];
}

/** Median and range of a sample, the form every benchmark figure is reported in. */
export interface Spread {
  median: number;
  min: number;
  max: number;
}

export function spread(xs: number[]): Spread {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  const median = s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
  return { median, min: s[0], max: s[s.length - 1] };
}

/**
 * sum_k x[xi + k] * y[yi + k] for k < n: the float64 reference's and the fits' inner loop. Four
 * independent accumulators let the JIT overlap the multiply-adds.
 */
export function dot(
  x: Float64Array | Float32Array,
  xi: number,
  y: Float64Array | Float32Array,
  yi: number,
  n: number,
): number {
  let s0 = 0;
  let s1 = 0;
  let s2 = 0;
  let s3 = 0;
  let k = 0;
  for (; k + 3 < n; k += 4) {
    s0 += x[xi + k] * y[yi + k];
    s1 += x[xi + k + 1] * y[yi + k + 1];
    s2 += x[xi + k + 2] * y[yi + k + 2];
    s3 += x[xi + k + 3] * y[yi + k + 3];
  }
  for (; k < n; k++) s0 += x[xi + k] * y[yi + k];
  return s0 + s1 + s2 + s3;
}

/** ||a - b|| / ||b||: how far a result is from its reference. */
export function relL2(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} != ${b.length}`);
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; i++) {
    num += (a[i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return Math.sqrt(num / den);
}
