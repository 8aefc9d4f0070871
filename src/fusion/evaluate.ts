import { argmax } from "../numeric.ts";

/**
 * Quality of a model on text: next-token loss and perplexity, and against a baseline (the unfused
 * model) the KL divergence of next-token distributions and how often their top-1 tokens agree.
 * Models are passed in as scorers, so the numbers come from whatever engine actually serves them.
 */

/** Logits [T, vocab] for a whole sequence (float32 from a session, float64 from the reference). */
export type Scorer = (ids: number[]) => Promise<Float32Array | Float64Array>;

export interface QualityReport {
  tokens: number;
  loss: number;
  ppl: number;
  kl?: number;
  top1_agreement?: number;
}

/** Splits a token stream into windows that fit the context; the first token of each is context only. */
export function windows(ids: number[], length: number): number[][] {
  const out: number[][] = [];
  for (let i = 0; i + 1 < ids.length; i += length) out.push(ids.slice(i, i + length));
  return out.filter((w) => w.length >= 2);
}

function logSoftmax(row: Float32Array | Float64Array, out: Float64Array): void {
  let max = -Infinity;
  for (let i = 0; i < row.length; i++) if (row[i] > max) max = row[i];
  let sum = 0;
  for (let i = 0; i < row.length; i++) sum += Math.exp(row[i] - max);
  const lse = max + Math.log(sum);
  for (let i = 0; i < row.length; i++) out[i] = row[i] - lse;
}

/** Each predicted token's negative log-likelihood, in order: what paired comparisons of two models need. */
export async function tokenLosses(
  sequences: number[][],
  vocab: number,
  model: Scorer,
): Promise<Float64Array> {
  const out = new Float64Array(sequences.reduce((n, s) => n + s.length - 1, 0));
  const lq = new Float64Array(vocab);
  let at = 0;
  for (const ids of sequences) {
    const logits = await model(ids);
    for (let t = 0; t + 1 < ids.length; t++) {
      logSoftmax(logits.subarray(t * vocab, (t + 1) * vocab), lq);
      out[at++] = -lq[ids[t + 1]];
    }
  }
  return out;
}

export async function evaluateQuality(
  sequences: number[][],
  vocab: number,
  model: Scorer,
  baseline?: Scorer,
  onProgress?: (done: number, total: number) => void,
): Promise<QualityReport> {
  let nll = 0;
  let kl = 0;
  let agree = 0;
  let count = 0;
  const lp = new Float64Array(vocab);
  const lq = new Float64Array(vocab);
  for (const [k, ids] of sequences.entries()) {
    const logits = await model(ids);
    const base = baseline ? await baseline(ids) : null;
    for (let t = 0; t + 1 < ids.length; t++) {
      logSoftmax(logits.subarray(t * vocab, (t + 1) * vocab), lq);
      nll -= lq[ids[t + 1]];
      if (base) {
        logSoftmax(base.subarray(t * vocab, (t + 1) * vocab), lp);
        let d = 0;
        for (let i = 0; i < vocab; i++) d += Math.exp(lp[i]) * (lp[i] - lq[i]);
        kl += d;
        if (argmax(lp) === argmax(lq)) agree++;
      }
      count++;
    }
    onProgress?.(k + 1, sequences.length);
  }
  const loss = nll / count;
  const report: QualityReport = { tokens: count, loss, ppl: Math.exp(loss) };
  if (baseline) {
    report.kl = kl / count;
    report.top1_agreement = agree / count;
  }
  return report;
}
