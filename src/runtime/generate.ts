import type { StreamDecoder, TextTokenizer } from "../model/tokenizer.ts";
import { DEFAULT_READBACK_BATCH, GpuTokenPicker } from "./gpu_decode.ts";
import type { PromptLogprob, TokenLogprob } from "./logprobs.ts";
import { Sampler, type SamplingParams } from "./sampling.ts";
import { disposeCache, type ModelSession } from "./session.ts";

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
  /** WebGPU only: tokens per readback in the GPU-resident loop (default 8); 0 forces host sampling. */
  readbackBatch?: number;
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

/** Sampling the GPU can do by itself: greedy, or plain temperature (Gumbel-max). */
function gpuSamplable(p: GenerateParams): boolean {
  return p.topK === 0 && p.topP === 1 && p.repetitionPenalty === 1 && !p.presencePenalty &&
    !p.frequencyPenalty;
}

/**
 * Prefills the prompt, then decodes one token per step, yielding text as it becomes final. Each step
 * is its own session run, so concurrent generations interleave on one session. Under WebGPU, when
 * the sampling allows it, tokens are chosen on the GPU and read back in batches (no readback per step).
 */
export async function* generate(opts: GenerateOptions): AsyncGenerator<GenerationChunk, GenerationSummary> {
  if (opts.promptIds.length === 0) throw new Error("generate needs at least one prompt token");
  const sink = new TokenSink(opts.tokenizer, opts.params, opts.eosTokenIds);
  const batch = opts.readbackBatch ?? DEFAULT_READBACK_BATCH;
  const onGpu = opts.session.device === "webgpu" && batch > 0 && gpuSamplable(opts.params);
  yield* onGpu ? gpuLoop(opts, sink, batch) : hostLoop(opts, sink);
  const tail = sink.tail().text;
  if (tail) yield { text: tail, tokenId: -1 };
  return sink.summary(opts.promptIds.length);
}

/** Logits to the host every step; the host samples (any sampling parameters). */
async function* hostLoop(opts: GenerateOptions, sink: TokenSink): AsyncGenerator<GenerationChunk> {
  const { session, params, signal } = opts;
  const sampler = new Sampler(params);
  const history = [...opts.promptIds];
  const vocab = session.vocabSize;
  let { logits, cache } = await session.step(opts.promptIds, session.emptyCache());
  let row = logits.subarray(logits.length - vocab);
  try {
    for (;;) {
      if (signal?.aborted) return sink.finish("cancelled");
      const id = sampler.next(row, history);
      history.push(id);
      const emit = sink.push(id).text;
      if (emit) yield { text: emit, tokenId: id };
      if (sink.done || cache.length + 1 >= opts.maxPositions) return;
      const next = await session.step([id], cache);
      cache = next.cache;
      row = next.logits;
    }
  } finally {
    disposeCache(cache);
  }
}

/**
 * Logits stay on the GPU; a kernel picks each token and feeds it to the next step as a GPU tensor.
 * Ids come back `batch` at a time, each readback overlapped with the next batch's decoding; a run
 * that ends mid-batch (EOS, stop sequence) discards the few tokens computed past its end.
 */
async function* gpuLoop(
  opts: GenerateOptions,
  sink: TokenSink,
  batch: number,
): AsyncGenerator<GenerationChunk> {
  const { session, params, signal } = opts;
  const vocab = session.vocabSize;
  const picker = await GpuTokenPicker.create(session, {
    temperature: params.temperature,
    seed: params.seed ?? Math.floor(Math.random() * 2 ** 32),
    maxSteps: params.maxTokens,
  });
  const room = opts.maxPositions - opts.promptIds.length;
  const total = Math.min(params.maxTokens, room);
  let cache = session.emptyCache();
  let pending: Promise<number[]> | null = null;
  let readFrom = 0;
  const consume = function* (ids: number[]): Generator<GenerationChunk> {
    for (const id of ids) {
      if (sink.done) return;
      const emit = sink.push(id).text;
      if (emit) yield { text: emit, tokenId: id };
    }
  };
  try {
    const first = await session.stepTensor(opts.promptIds, cache);
    cache = first.cache;
    picker.pick(first.logits.gpuBuffer as GPUBuffer, opts.promptIds.length - 1, vocab);
    first.logits.dispose();
    while (!sink.done) {
      if (signal?.aborted) return sink.finish("cancelled");
      const flush = picker.steps - readFrom >= batch || picker.steps >= total;
      if (flush && picker.steps > readFrom) {
        const ready = pending;
        pending = picker.readBack(readFrom, picker.steps);
        readFrom = picker.steps;
        if (ready) yield* consume(await ready);
      }
      if (picker.steps >= total) {
        if (pending) yield* consume(await pending);
        pending = null;
        if (!sink.done) sink.finish("length");
        return;
      }
      const next = await session.stepTensor(picker.nextIds, cache);
      cache = next.cache;
      picker.pick(next.logits.gpuBuffer as GPUBuffer, 0, vocab);
      next.logits.dispose();
    }
  } finally {
    if (pending) await pending.catch(() => {});
    disposeCache(cache);
    picker.destroy();
  }
}
