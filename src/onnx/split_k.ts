/**
 * How many parts a decode step's float MatMul splits its inner dimension into.
 *
 * onnxruntime's WebGPU MatMul gives each 32 output columns one workgroup of 64 threads, and that
 * workgroup walks the whole inner dimension alone (its own split-K is enabled only on some Intel
 * GPUs). At one row a step, a [2048 x 8192] weight is 256 workgroups and a [8192 x 2048] one 64, on a
 * GPU that keeps thousands resident: each is a long serial loop, and the weights stream at about 100
 * GB/s of an H200's 4,000 (bench/results/2026-12-04-h200-nemotron-nas-1b.txt: a 1B step spends 24 ms
 * on the GPU, its host 2-3 ms). Split into S parts, the MatMul runs as a batch, [S, rows, K/S] x
 * [S, K/S, N], with S times the workgroups each S times shorter, and a ReduceSum adds the parts.
 *
 * S is the largest power of two that keeps the workgroups at most `workgroups` (about what an H200's
 * 132 multiprocessors hold at once) and each part at least `minPart` deep (shorter parts spend more
 * on the partial sums than they save). Below `minInner` nothing is split: a short loop costs less
 * than the two dispatches the split adds (a Transpose and the ReduceSum), and a small model's step
 * is bound by its dispatches, not its bytes.
 */
export interface SplitK {
  workgroups: number;
  minPart: number;
  minInner: number;
}

export const DEFAULT_SPLIT_K: SplitK = { workgroups: 4096, minPart: 128, minInner: 1024 };

/** Parts of the inner dimension K of a [K, N] weight (1: not split). */
export function splitFactor(k: number, n: number, p: SplitK = DEFAULT_SPLIT_K): number {
  const columnGroups = Math.ceil(n / 32);
  let s = 1;
  if (k < p.minInner) return s;
  while (columnGroups * s * 2 <= p.workgroups && k % (s * 2) === 0 && k / (s * 2) >= p.minPart) s *= 2;
  return s;
}
