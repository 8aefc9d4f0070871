/** Seconds of history the live throughput is averaged over. */
const WINDOW_S = 10;
/** Recent first-token latencies kept for the live percentiles. */
const TTFT_SAMPLES = 200;

/**
 * What the dashboard shows as "live": generated tokens per second over the last few seconds and the
 * time to first token of the latest requests. Prometheus histograms answer the same questions with
 * bucket resolution over the process's life; this answers them for now, exactly.
 */
export class LiveStats {
  /** Tokens per wall-clock second, a ring indexed by the second, with the second each slot holds. */
  private readonly tokens = new Float64Array(WINDOW_S + 1);
  private readonly second = new Float64Array(WINDOW_S + 1).fill(-1);
  private readonly ttfts: number[] = [];

  addTokens(n: number, now = Date.now()): void {
    const s = Math.floor(now / 1000);
    const i = s % this.tokens.length;
    if (this.second[i] !== s) {
      this.second[i] = s;
      this.tokens[i] = 0;
    }
    this.tokens[i] += n;
  }

  addTtft(seconds: number): void {
    this.ttfts.push(seconds);
    if (this.ttfts.length > TTFT_SAMPLES) this.ttfts.shift();
  }

  /** Throughput over the last complete seconds; TTFT percentiles (nearest rank) of the kept samples. */
  snapshot(now = Date.now()) {
    const s = Math.floor(now / 1000);
    let total = 0;
    for (let i = 0; i < this.tokens.length; i++) {
      if (this.second[i] >= s - WINDOW_S && this.second[i] < s) total += this.tokens[i];
    }
    const sorted = [...this.ttfts].sort((a, b) => a - b);
    const rank = (q: number) => sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)] * 1000;
    return {
      tokens_per_second: total / WINDOW_S,
      window_seconds: WINDOW_S,
      ttft_ms: sorted.length ? { p50: rank(0.5), p99: rank(0.99), samples: sorted.length } : null,
    };
  }
}
