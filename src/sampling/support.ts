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

/** Bins of log-weight a row's mass is counted in to find where its top-p ends. */
const BINS = 1024;

/**
 * The ids among `ids` that the first `p` of their mass can need, in no order: `logWeight[j]` is id j's
 * log-weight (at most 0), `weight[j]` its weight over the mass's total. Mass is counted in bins of
 * log-weight from the top; ids in the bins up to the one where it reaches `p` are kept, and one bin
 * more, against the rounding of a sum taken in another order.
 */
export function nucleusIds(
  ids: number[],
  logWeight: Float64Array,
  weight: Float64Array,
  p: number,
): number[] {
  let low = 0;
  for (let j = 0; j < ids.length; j++) if (logWeight[j] > -Infinity) low = Math.min(low, logWeight[j]);
  if (low === 0) return ids;
  // A token a grammar masked (-Infinity, no weight) counts in the last bin.
  const binOf = (j: number) => Math.min(BINS - 1, Math.floor((Math.max(logWeight[j], low) / low) * BINS));
  const mass = new Float64Array(BINS);
  for (let j = 0; j < ids.length; j++) mass[binOf(j)] += weight[j];
  let last = 0;
  for (let cum = mass[0]; cum < p && last < BINS - 1;) cum += mass[++last];
  let bound = Math.min(BINS - 1, last + 1);
  while (bound < BINS - 1 && mass[bound] === 0) bound++;
  return ids.filter((_, j) => binOf(j) <= bound);
}
