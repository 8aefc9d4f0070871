import type { GrammarSpec } from "../sampling/grammar.ts";
import type { StreamDecoder, TextTokenizer } from "../model/tokenizer.ts";
import { Channel } from "../channel.ts";
import type { PromptLogprob, TokenLogprob } from "../sampling/logprobs.ts";
import type { SamplingParams } from "../sampling/sampling.ts";

export interface GenerateParams extends SamplingParams {
  maxTokens: number;
  stop: string[];
  /** Keep going past the end-of-sequence token (benchmarks want a fixed length). */
  ignoreEos?: boolean;
  /** More ids that end the generation like EOS: a chat template's end-of-turn token. */
  stopTokenIds?: number[];
  /** Report each generated token's log-probability and this many alternatives (0..20). */
  logprobs?: number;
  /** Report the prompt's log-probabilities too (OpenAI's echo): the whole prompt is prefilled. */
  promptLogprobs?: boolean;
  /** What the output must match (a JSON schema, a regex, ...): tokens it does not allow are masked. */
  grammar?: GrammarSpec;
}

export type FinishReason = "stop" | "length" | "cancelled";

export interface GenerationChunk {
  text: string;
  tokenId: number;
  /** The tokens whose text this chunk made final, when logprobs were asked for. */
  logprobs?: TokenLogprob[];
  /** Once, before the first token, when the prompt's log-probabilities were asked for. */
  promptLogprobs?: PromptLogprob[];
}

export interface GenerationSummary {
  finishReason: FinishReason;
  promptTokens: number;
  completionTokens: number;
  text: string;
  /** The generated ids, end-of-sequence included when it ended the run. */
  ids: number[];
  /** Prompt tokens whose KV came from a cached prefix instead of being prefilled. */
  cachedTokens: number;
}

/** What happens to one sequence's output, in order: chunks, then done or failed. */
export interface SequenceHandlers {
  chunk(c: GenerationChunk): void;
  done(s: GenerationSummary): void;
  failed(e: unknown): void;
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

/** What takes sequences to decode: a plan instance's engine (engine_base.ts). */
export interface SequenceSink {
  submit(id: number, promptIds: number[], params: GenerateParams, handlers: SequenceHandlers): void;
  cancel(id: number): void;
}

export interface GenerateOptions {
  engine: SequenceSink;
  promptIds: number[];
  params: GenerateParams;
  signal?: AbortSignal;
}

/**
 * Everything that happens to a chosen token on the host: end-of-sequence, detokenisation, stop
 * sequences, accounting. Both decode loops feed it, whichever device chose the token.
 */
export class TokenSink {
  private readonly decoder: StreamDecoder;
  private readonly stops: StopMatcher;
  private readonly eos: Set<number>;
  readonly ids: number[] = [];
  text = "";
  finishReason: FinishReason = "length";
  private hitStopSequence = false;
  /** Logprobs of tokens whose text is still held back. */
  private readonly pendingLogprobs: TokenLogprob[] = [];
  done = false;

  constructor(tokenizer: TextTokenizer, private readonly params: GenerateParams, eosTokenIds: number[]) {
    this.decoder = tokenizer.streamDecoder();
    this.stops = new StopMatcher(params.stop);
    this.eos = new Set(params.ignoreEos ? [] : [...eosTokenIds, ...params.stopTokenIds ?? []]);
  }

  /**
   * Takes one token (and its logprob, when asked for); returns the text that became final, possibly
   * empty, and the logprobs of the tokens that text comes from. The token that ends the run (EOS,
   * end of turn) is not reported: it makes no text.
   */
  push(id: number, logprob?: TokenLogprob): { text: string; logprobs?: TokenLogprob[] } {
    this.ids.push(id);
    if (this.eos.has(id)) {
      this.finish("stop");
      return { text: "" };
    }
    if (logprob) this.pendingLogprobs.push(logprob);
    const { emit, stopped } = this.stops.push(this.decoder.push(id));
    this.text += emit;
    if (stopped) {
      this.hitStopSequence = true;
      this.finish("stop");
    } else if (this.ids.length >= this.params.maxTokens) this.finish("length");
    return emit ? { text: emit, ...this.takeLogprobs() } : { text: "" };
  }

  private takeLogprobs(): { logprobs?: TokenLogprob[] } {
    return this.pendingLogprobs.length ? { logprobs: this.pendingLogprobs.splice(0) } : {};
  }

  finish(reason: FinishReason): void {
    if (!this.done) this.finishReason = reason;
    this.done = true;
  }

  /** Text still held back (an incomplete character, a possible stop prefix) once the run is over. */
  tail(): { text: string; logprobs?: TokenLogprob[] } {
    if (this.hitStopSequence || this.finishReason === "cancelled") {
      return { text: "", ...this.takeLogprobs() };
    }
    const { emit } = this.stops.push(this.decoder.flush());
    const rest = emit + this.stops.flush();
    this.text += rest;
    return { text: rest, ...this.takeLogprobs() };
  }

  summary(promptTokens: number, cachedTokens = 0): GenerationSummary {
    return {
      finishReason: this.finishReason,
      promptTokens,
      completionTokens: this.ids.length,
      text: this.text,
      ids: this.ids,
      cachedTokens,
    };
  }
}

/** Ids of sequences submitted here: negative, apart from the serving worker's request ids. */
let nextId = -1;

type Event =
  | { type: "chunk"; chunk: GenerationChunk }
  | { type: "done"; summary: GenerationSummary }
  | { type: "failed"; error: unknown };

/**
 * One sequence through an engine, its text yielded as it becomes final: the engine decodes it with
 * whatever else it runs. Aborting `signal`, or leaving the loop early, cancels it.
 */
export async function* generate(opts: GenerateOptions): AsyncGenerator<GenerationChunk, GenerationSummary> {
  const id = nextId--;
  const events = new Channel<Event>();
  let ended = false;
  opts.engine.submit(id, opts.promptIds, opts.params, {
    chunk: (chunk) => events.put({ type: "chunk", chunk }),
    done: (summary) => events.put({ type: "done", summary }),
    failed: (error) => events.put({ type: "failed", error }),
  });
  const cancel = () => opts.engine.cancel(id);
  opts.signal?.addEventListener("abort", cancel, { once: true });
  if (opts.signal?.aborted) cancel();
  try {
    for (;;) {
      const e = await events.take();
      if (e.type === "chunk") yield e.chunk;
      else if (e.type === "done") {
        ended = true;
        return e.summary;
      } else {
        ended = true;
        throw e.error;
      }
    }
  } finally {
    opts.signal?.removeEventListener("abort", cancel);
    if (!ended) cancel();
  }
}
