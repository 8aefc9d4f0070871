/**
 * The tokens a top-k or top-p distribution can hold, found in linear passes over a row instead of a sort
 * of the whole vocabulary: sorting 128K logits a row took ~25 ms in JS (bench/results/2026-12-05-cpu-llama-3.2-1b-batched-prefill-sampling.txt),
 * more than a whole decode step of 8 rows of the 1B shape on native onnxruntime. Ranks are those of a
 * stable sort by logit, highest first: of two equal logits the lower id ranks first.
 */

/** Whether id `a` ranks before id `b` in `row`. */
export function ranksBefore(row: Float32Array, a: number, b: number): boolean {
  return row[a] > row[b] || (row[a] === row[b] && a < b);
}

/** `ids` sorted by rank in `row`, in place. */
export function byRank(row: Float32Array, ids: number[]): number[] {
  return ids.sort((a, b) => row[b] - row[a] || a - b);
}

/**
 * The `k` ids ranking first in `row`, in no order: one pass keeping them in a heap whose root ranks
 * last, so most ids cost one comparison.
 */
export function topIds(row: Float32Array, k: number): number[] {
  const heap: number[] = [];
  const after = (i: number, j: number) => ranksBefore(row, heap[j], heap[i]);
  const swap = (i: number, j: number) => ([heap[i], heap[j]] = [heap[j], heap[i]]);
  for (let id = 0; id < row.length; id++) {
    if (heap.length < k) {
      heap.push(id);
      for (let i = heap.length - 1; i > 0 && after(i, (i - 1) >> 1); i = (i - 1) >> 1) swap(i, (i - 1) >> 1);
    } else if (ranksBefore(row, id, heap[0])) {
      heap[0] = id;
      for (let i = 0;;) {
        let last = i;
        for (const c of [2 * i + 1, 2 * i + 2]) if (c < k && after(c, last)) last = c;
        if (last === i) break;
        swap(i, last);
        i = last;
      }
    }
  }
  return heap;
}

/** Bins a row's mass is counted in by log-weight, from 0 down to -LOG_WEIGHT_SPAN (the rest in the last). */
const BINS = 1024;
/** Log-weights below this weigh under 1e-17 each: together less than float64 can tell beside the top's. */
const LOG_WEIGHT_SPAN = 40;

/**
 * The weight sum(exp((row[id] - max) / t)) over `support` (null: every id), and the ids that the first
 * `p` of it can need, in no order: one pass counts the mass in bins of log-weight; ids in the bins from
 * the top to the one where it reaches `p` are kept, and the next bin that holds any, against the rounding
 * of a sum taken in another order. Every id of the support where `p` is 1.
 */
export function weighSupport(
  row: Float32Array,
  support: number[] | null,
  max: number,
  t: number,
  p: number,
): { sum: number; candidates: number[] } {
  const size = support ? support.length : row.length;
  const mass = p < 1 ? new Float64Array(BINS) : null;
  // A token a grammar masked (-Infinity, no weight) counts in the last bin.
  const binOf = (id: number) =>
    Math.min(BINS - 1, Math.floor(((max - row[id]) / t / LOG_WEIGHT_SPAN) * BINS));
  let sum = 0;
  for (let j = 0; j < size; j++) {
    const id = support ? support[j] : j;
    const w = Math.exp((row[id] - max) / t);
    sum += w;
    if (mass) mass[binOf(id)] += w;
  }
  const all = () => support ?? Array.from({ length: row.length }, (_, i) => i);
  if (!mass) return { sum, candidates: all() };
  let bound = 0;
  for (let cum = mass[0]; cum < p * sum && bound < BINS - 1;) cum += mass[++bound];
  bound = Math.min(BINS - 1, bound + 1);
  while (bound < BINS - 1 && mass[bound] === 0) bound++;
  const candidates: number[] = [];
  for (let j = 0; j < size; j++) {
    const id = support ? support[j] : j;
    if (binOf(id) <= bound) candidates.push(id);
  }
  return { sum, candidates };
}
