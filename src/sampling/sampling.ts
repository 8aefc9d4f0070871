import { argmax, expNonPositive, rng } from "../numeric.ts";
import { logSoftmaxTop, type Scored } from "./logprobs.ts";
import { byRank, topIds, weighSupport } from "./support.ts";

/** How the next token is chosen from a row of logits. temperature 0 means greedy (argmax). */
export interface SamplingParams {
  temperature: number;
  /** 0 disables top-k. */
  topK: number;
  /** 1 disables nucleus filtering. */
  topP: number;
  /** 1 disables the penalty; > 1 discourages tokens already in the context (CTRL-style). */
  repetitionPenalty: number;
  /** OpenAI's: subtracted once from the logit of every token already generated (-2..2; 0 disables). */
  presencePenalty?: number;
  /** OpenAI's: subtracted per time a token was already generated (-2..2; 0 disables). */
  frequencyPenalty?: number;
  seed?: number;
}

export const DEFAULT_SAMPLING: SamplingParams = { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1 };

export class Sampler {
  private readonly random: () => number;
  /** How often each id was chosen so far: what the presence and frequency penalties count. */
  private readonly generated = new Map<number, number>();
  /** Scratch for the unnormalised probabilities of one row (one allocation per sampler). */
  private weights = new Float64Array(0);
  /** The row `next` chose from, penalties applied: what `score` reports on. */
  private lastRow: Float32Array = new Float32Array(0);
  /** The filtered distribution `next` drew from, when it built one (top-k or top-p): `score` reuses its sort. */
  private lastDistribution: { ids: number[]; probs: number[] } | null = null;

  constructor(readonly params: SamplingParams) {
    this.random = rng(params.seed ?? Math.floor(Math.random() * 2 ** 32));
  }

  /** Picks the next id; `history` is every id in the context (prompt and generated) for the penalty. */
  next(logits: Float32Array, history: Iterable<number>): number {
    const p = this.params;
    let row = logits;
    if (p.repetitionPenalty !== 1) {
      row = Float32Array.from(logits);
      for (const id of new Set(history)) {
        row[id] = row[id] > 0 ? row[id] / p.repetitionPenalty : row[id] * p.repetitionPenalty;
      }
    }
    const presence = p.presencePenalty ?? 0;
    const frequency = p.frequencyPenalty ?? 0;
    if ((presence || frequency) && this.generated.size) {
      if (row === logits) row = Float32Array.from(logits);
      for (const [id, n] of this.generated) row[id] -= presence + frequency * n;
    }
    this.lastRow = row;
    this.lastDistribution = null;
    const id = p.temperature === 0 ? argmax(row) : this.sample(row);
    this.generated.set(id, (this.generated.get(id) ?? 0) + 1);
    return id;
  }

  /**
   * Whether its draws need only the temperature's softmax of each row: no top-k, top-p or penalty
   * changes the row first. Such a sampler may draw from exponentials computed elsewhere (`draw`).
   */
  get plain(): boolean {
    const p = this.params;
    return p.temperature > 0 && p.topK === 0 && p.topP === 1 && p.repetitionPenalty === 1 &&
      !p.presencePenalty && !p.frequencyPenalty;
  }

  /**
   * A plain sampler's next id from `probs`, the softmax of its row over its temperature: the draw
   * `next` makes from the row itself (the same random number, up to the softmax's rounding).
   * `score` is not available after it.
   */
  draw(probs: Float32Array): number {
    let u = this.random();
    let id = -1;
    for (let i = 0; i < probs.length && id < 0; i++) if ((u -= probs[i]) < 0) id = i;
    // Rounding left u past the sum: the likeliest, as `next` does.
    if (id < 0) id = argmax(probs);
    this.lastRow = new Float32Array(0);
    this.lastDistribution = null;
    this.generated.set(id, (this.generated.get(id) ?? 0) + 1);
    return id;
  }

  /**
   * Log-probabilities from the distribution the last `next` sampled from (penalties, temperature,
   * top-k and top-p applied): of `id` and of the `n` likeliest. Greedy reports the model's own
   * distribution (temperature 1), whose argmax it took.
   */
  score(id: number, n: number): Scored {
    const p = this.params;
    const row = this.lastRow;
    if (p.temperature === 0 || (p.topK === 0 && p.topP === 1)) {
      return logSoftmaxTop(row, id, n, p.temperature || 1);
    }
    const { ids, probs } = this.lastDistribution ?? this.distribution(row);
    const at = ids.indexOf(id);
    return {
      logprob: at < 0 ? -Infinity : Math.log(probs[at]),
      top: ids.slice(0, n).map((i, k) => [i, Math.log(probs[k])]),
    };
  }

  /** The filtered, renormalised distribution `next` samples from: exposed so tests can check it. */
  distribution(row: Float32Array): { ids: number[]; probs: number[] } {
    const p = this.params;
    const support = p.topK > 0 && p.topK < row.length ? topIds(row, p.topK) : null;
    let max = -Infinity;
    if (support) { for (const id of support) max = Math.max(max, row[id]); }
    else max = row[argmax(row)];
    const { sum, candidates } = weighSupport(row, support, max, p.temperature, p.topP);
    const probOf = (id: number) => Math.exp((row[id] - max) / p.temperature) / sum;
    const size = support?.length ?? row.length;
    // The ranked prefix holding top-p of the mass; null where the candidates run out first (rounding at
    // the edge of weighSupport's bins), so that the whole support is ranked instead.
    const nucleus = (ids: number[]) => {
      const ranked = byRank(row, ids);
      if (p.topP >= 1) return ranked;
      let cum = 0;
      let keep = 0;
      while (keep < ranked.length && cum < p.topP) cum += probOf(ranked[keep++]);
      return cum < p.topP && ranked.length < size ? null : ranked.slice(0, Math.max(1, keep));
    };
    const ids = nucleus(candidates) ??
      nucleus(support ?? Array.from({ length: row.length }, (_, i) => i))!;
    const probs = ids.map(probOf);
    const kept = p.topP < 1 ? probs.reduce((a, b) => a + b, 0) : 1;
    return { ids, probs: probs.map((x) => x / kept) };
  }

  private sample(row: Float32Array): number {
    if (this.params.topK === 0 && this.params.topP === 1) return this.sampleFull(row);
    const { ids, probs } = this.lastDistribution = this.distribution(row);
    let u = this.random();
    for (let i = 0; i < ids.length; i++) {
      u -= probs[i];
      if (u < 0) return ids[i];
    }
    return ids[ids.length - 1];
  }

  /**
   * Plain temperature sampling in two linear passes: no sort of the vocabulary, which in a batch of
   * 16 sequences would cost more than the decode step. The same distribution as `distribution`, up to
   * expNonPositive's 2e-7: at 128K tokens a row took 1.3 ms with Math.exp, 2 ms of every row's turn
   * in a served batch of the 1B shape on 2 cores.
   */
  private sampleFull(row: Float32Array): number {
    const scale = 1 / this.params.temperature;
    const max = row[argmax(row)];
    if (this.weights.length !== row.length) this.weights = new Float64Array(row.length);
    const w = this.weights;
    let sum = 0;
    for (let i = 0; i < row.length; i++) sum += w[i] = expNonPositive((row[i] - max) * scale);
    let u = this.random() * sum;
    for (let i = 0; i < row.length; i++) {
      u -= w[i];
      if (u < 0) return i;
    }
    return argmax(row);
  }
}
