import type { TextTokenizer } from "../model/tokenizer.ts";
import { Sampler, type SamplingParams } from "./sampling.ts";
import { disposeCache, type ModelSession } from "./session.ts";

export interface GenerateParams extends SamplingParams {
  maxTokens: number;
  stop: string[];
  /** Keep going past the end-of-sequence token (benchmarks want a fixed length). */
  ignoreEos?: boolean;
}

export type FinishReason = "stop" | "length" | "cancelled";

export interface GenerationChunk {
  text: string;
  tokenId: number;
}

export interface GenerationSummary {
  finishReason: FinishReason;
  promptTokens: number;
  completionTokens: number;
  text: string;
  /** The generated ids, end-of-sequence included when it ended the run. */
  ids: number[];
}

/**
 * Holds back text that could still turn into a stop sequence, and cuts the output where one appears.
 */
export class StopMatcher {
  private pending = "";

  constructor(private readonly stops: string[]) {}

  /** Returns text now safe to emit, and whether a stop sequence was hit. */
  push(text: string): { emit: string; stopped: boolean } {
    this.pending += text;
    let cut = -1;
    for (const s of this.stops) {
      const at = this.pending.indexOf(s);
      if (at >= 0 && (cut < 0 || at < cut)) cut = at;
    }
    if (cut >= 0) {
      const emit = this.pending.slice(0, cut);
      this.pending = "";
      return { emit, stopped: true };
    }
    let hold = 0;
    for (const s of this.stops) {
      for (let k = Math.min(s.length - 1, this.pending.length); k > hold; k--) {
        if (this.pending.endsWith(s.slice(0, k))) {
          hold = k;
          break;
        }
      }
    }
    const emit = this.pending.slice(0, this.pending.length - hold);
    this.pending = this.pending.slice(this.pending.length - hold);
    return { emit, stopped: false };
  }

  flush(): string {
    const rest = this.pending;
    this.pending = "";
    return rest;
  }
}

export interface GenerateOptions {
  session: ModelSession;
  tokenizer: TextTokenizer;
  promptIds: number[];
  params: GenerateParams;
  eosTokenIds: number[];
  maxPositions: number;
  signal?: AbortSignal;
}

/**
 * Prefills the prompt, then decodes one token per step, yielding text as it becomes final. Each step
 * is its own session run, so concurrent generations interleave on one session.
 */
export async function* generate(opts: GenerateOptions): AsyncGenerator<GenerationChunk, GenerationSummary> {
  const { session, tokenizer, promptIds, params, signal } = opts;
  if (promptIds.length === 0) throw new Error("generate needs at least one prompt token");
  const sampler = new Sampler(params);
  const decoder = tokenizer.streamDecoder();
  const stops = new StopMatcher(params.stop);
  const eos = new Set(params.ignoreEos ? [] : opts.eosTokenIds);
  const history = [...promptIds];
  const ids: number[] = [];
  const vocab = session.vocabSize;
  let text = "";
  let generated = 0;
  let finishReason: FinishReason = "length";
  let hitStopSequence = false;
  let { logits, cache } = await session.step(promptIds, session.emptyCache());
  let row = logits.subarray(logits.length - vocab);
  try {
    while (generated < params.maxTokens) {
      if (signal?.aborted) {
        finishReason = "cancelled";
        break;
      }
      const id = sampler.next(row, history);
      generated++;
      ids.push(id);
      if (eos.has(id)) {
        finishReason = "stop";
        break;
      }
      history.push(id);
      const { emit, stopped } = stops.push(decoder.push(id));
      if (emit) {
        text += emit;
        yield { text: emit, tokenId: id };
      }
      if (stopped) {
        finishReason = "stop";
        hitStopSequence = true;
        break;
      }
      if (generated >= params.maxTokens || cache.length + 1 >= opts.maxPositions) break;
      const next = await session.step([id], cache);
      cache = next.cache;
      row = next.logits;
    }
    if (!hitStopSequence && finishReason !== "cancelled") {
      const { emit } = stops.push(decoder.flush());
      const tail = emit + stops.flush();
      if (tail) {
        text += tail;
        yield { text: tail, tokenId: -1 };
      }
    }
  } finally {
    disposeCache(cache);
  }
  return { finishReason, promptTokens: promptIds.length, completionTokens: generated, text, ids };
}
