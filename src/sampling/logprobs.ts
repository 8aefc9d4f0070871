import type { TextTokenizer } from "../model/tokenizer.ts";

/** OpenAI allows at most 20 alternatives per position (chat `top_logprobs`). */
export const MAX_TOP_LOGPROBS = 20;

/** One alternative at a position: its text, its bytes, its log-probability. */
export interface TopLogprob {
  token: string;
  bytes: number[];
  logprob: number;
}

/** A chosen (or, for a prompt, given) token with its log-probability and the `n` most likely ones. */
export interface TokenLogprob extends TopLogprob {
  top: TopLogprob[];
}

/** A prompt's first token has nothing before it to be predicted from: null, as OpenAI's echo gives. */
export type PromptLogprob = TokenLogprob | { token: string; bytes: number[]; logprob: null; top: null };

/** Log-probabilities of ids over a distribution: the chosen one's and the `n` largest, largest first. */
export interface Scored {
  logprob: number;
  top: [id: number, logprob: number][];
}

/**
 * log-softmax(row / temperature) at `id`, and the `n` most likely ids: two linear passes and an
 * n-wide insertion list, no sort of the vocabulary (128k entries at Llama-3 scale, every token).
 */
export function logSoftmaxTop(row: Float32Array, id: number, n: number, temperature = 1): Scored {
  let max = -Infinity;
  for (let i = 0; i < row.length; i++) if (row[i] > max) max = row[i];
  let sum = 0;
  for (let i = 0; i < row.length; i++) sum += Math.exp((row[i] - max) / temperature);
  const norm = max / temperature + Math.log(sum);
  const top: [number, number][] = [];
  if (n > 0) {
    for (let i = 0; i < row.length; i++) {
      const v = row[i];
      // A token a grammar masked out is no alternative: the list ends where the allowed ones do.
      if (v === -Infinity || (top.length === n && v <= row[top[n - 1][0]])) continue;
      let at = top.length;
      while (at > 0 && row[top[at - 1][0]] < v) at--;
      top.splice(at, 0, [i, 0]);
      if (top.length > n) top.pop();
    }
    for (const t of top) t[1] = row[t[0]] / temperature - norm;
  }
  return { logprob: row[id] / temperature - norm, top };
}

/** Ids and log-probabilities as the wire shows them: each token's text and bytes. */
export function describe(tokenizer: TextTokenizer, id: number, scored: Scored): TokenLogprob {
  const piece = (i: number) => tokenizer.piece(i);
  return {
    token: piece(id).text,
    bytes: piece(id).bytes,
    logprob: scored.logprob,
    top: scored.top.map(([i, logprob]) => ({ token: piece(i).text, bytes: piece(i).bytes, logprob })),
  };
}
