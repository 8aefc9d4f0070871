import { Grammars, type GrammarSpec, type GrammarState } from "../sampling/grammar.ts";
import type { TextTokenizer } from "../model/tokenizer.ts";
import type { GenerateParams, SequenceHandlers } from "./generate.ts";
import { TokenSink } from "./generate.ts";
import { describe, logSoftmaxTop, type PromptLogprob } from "../sampling/logprobs.ts";

/** Prompt tokens prefilled per session run: long prompts are cut so decode steps run in between. */
export const PREFILL_CHUNK = 128;

/** What every engine knows of a sequence. */
export interface Sequence {
  id: number;
  prompt: number[];
  params: GenerateParams;
  sink: TokenSink;
  handlers: SequenceHandlers;
  /** Alternatives per generated token's logprobs; undefined when none were asked for. */
  logprobs?: number;
  /** The prompt's logprobs as its prefill computes them; null when not asked for. */
  promptLogprobs: PromptLogprob[] | null;
  /** Prompt tokens already in its cache. */
  prefilled: number;
  /** Prompt tokens taken from a cached prefix; null until its prefix was looked up. */
  cached: number | null;
  cancelled: boolean;
  /** Its place in its grammar, when its output is constrained (made before its first token). */
  grammar: GrammarState | null;
}

/** Vocabularies from this size get their grammar tables built when the instance is idle (prepareGrammars). */
export const EAGER_GRAMMAR_VOCAB = 32768;

/** Length of the common prefix of two token lists. */
export function commonPrefix(a: number[], b: number[]): number {
  const n = Math.min(a.length, b.length);
  let i = 0;
  while (i < n && a[i] === b[i]) i++;
  return i;
}

/**
 * The one owner of a session's sequences (llama.cpp's slots): a loop that turns while anything is
 * prefilling or decoding, each turn a decode step of every decoding sequence and a chunk of the
 * oldest prompt. Engines differ in where the KV cache lives and where tokens are chosen; what a
 * sequence goes through (submitted, cancelled, answered once, failed once) is here.
 */
export abstract class EngineBase<S extends Sequence> {
  protected readonly prefilling: S[] = [];
  protected readonly byId = new Map<number, S>();
  private looping = false;
  private readonly idleWaiters: (() => void)[] = [];
  /** The largest batch decoded so far. */
  peakRows = 0;
  private lastNote = 0;

  constructor(
    protected readonly tokenizer: TextTokenizer,
    protected readonly eosTokenIds: number[],
    protected readonly maxPositions: number,
    private readonly onKv: (bytes: number) => void,
  ) {}

  /** KV bytes one token of one sequence takes. */
  abstract readonly bytesPerToken: number;

  /** Width of a row of logits: what a grammar's mask covers. */
  protected abstract readonly vocabSize: number;

  private compiledGrammars: Grammars | null = null;

  /** Grammars compiled against this engine's vocabulary (its tables built at the first one). */
  protected get grammars(): Grammars {
    return this.compiledGrammars ??= new Grammars(() => this.tokenizer.vocabularyInfo(this.vocabSize));
  }

  /** The sequence's matcher, made at its first token; null when its output is free. */
  protected async grammarOf(seq: S): Promise<GrammarState | null> {
    const spec = seq.params.grammar;
    if (!spec) return null;
    return seq.grammar ??= await this.grammars.matcher(spec, [
      ...this.eosTokenIds,
      ...seq.params.stopTokenIds ?? [],
    ]);
  }

  /** KV bytes held now. */
  abstract get kvBytes(): number;

  /** The engine's own fields of a new sequence. */
  protected abstract start(seq: Sequence): S;

  /** Whether the loop has anything left to do. */
  protected abstract get busy(): boolean;

  /** One turn of the loop. */
  protected abstract turn(): Promise<void>;

  /** Rows decoding now, for peakRows. */
  protected abstract get rows(): number;

  /**
   * Builds the grammar engine's vocabulary tables while nothing decodes, for vocabularies large enough
   * that building them at the first constrained request would pause every stream of the instance
   * (173 ms at 128K tokens, bench/results/2026-12-04-grammar-cost.txt; ~13 ms at tiny-nas's 4096,
   * where loading the engine for models that may never see a grammar would cost more than it saves).
   * Requests that arrive meanwhile wait for it; no stream is running to pause.
   */
  async prepareGrammars(): Promise<void> {
    if (this.vocabSize < EAGER_GRAMMAR_VOCAB || this.busy) return;
    await this.grammars.prepare();
  }

  /** Compiles a grammar ahead of the sequences that use it, so a bad one is refused before any token. */
  async checkGrammar(spec: GrammarSpec): Promise<void> {
    await this.grammars.compile(spec);
  }

  submit(id: number, promptIds: number[], params: GenerateParams, handlers: SequenceHandlers): void {
    if (promptIds.length === 0) {
      handlers.failed(new Error("generate needs at least one prompt token"));
      return;
    }
    const seq = this.start({
      id,
      prompt: promptIds,
      params,
      sink: new TokenSink(this.tokenizer, params, this.eosTokenIds),
      handlers,
      logprobs: params.logprobs,
      promptLogprobs: params.promptLogprobs ? [] : null,
      prefilled: 0,
      cached: null,
      cancelled: false,
      grammar: null,
    });
    this.byId.set(id, seq);
    this.prefilling.push(seq);
    void this.loop();
  }

  /** Ends a sequence at the next turn (finish reason "cancelled"). */
  cancel(id: number): void {
    const seq = this.byId.get(id);
    if (seq) seq.cancelled = true;
  }

  /** Resolves once the loop has nothing left to do (every cache released or kept). */
  idle(): Promise<void> {
    if (!this.looping) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** Cancels everything and waits for the loop to stop. */
  async close(): Promise<void> {
    for (const s of this.byId.values()) s.cancelled = true;
    while (this.looping) await new Promise((r) => setTimeout(r, 1));
  }

  private async loop(): Promise<void> {
    if (this.looping) return;
    this.looping = true;
    try {
      while (this.busy) await this.turn();
      this.noteKv(true);
    } finally {
      this.looping = false;
      for (const wake of this.idleWaiters.splice(0)) wake();
    }
  }

  /**
   * The model's log-probability of each prompt token given the ones before it (raw logits: no
   * penalty or temperature applies to text the model did not choose), from a chunk's logits.
   * Called before `prefilled` moves past the chunk.
   */
  protected scorePrompt(seq: S, logits: Float32Array, vocab: number): void {
    const out = seq.promptLogprobs!;
    if (seq.prefilled === 0) {
      const first = this.tokenizer.piece(seq.prompt[0]);
      out.push({ token: first.text, bytes: first.bytes, logprob: null, top: null });
    }
    for (let p = 0; p * vocab < logits.length; p++) {
      const next = seq.prompt[seq.prefilled + p + 1];
      if (next === undefined) break;
      const row = logits.subarray(p * vocab, (p + 1) * vocab);
      out.push(describe(this.tokenizer, next, logSoftmaxTop(row, next, seq.logprobs ?? 0)));
    }
  }

  /** Hands the prompt's logprobs over once, before the first token. */
  protected sendPromptLogprobs(seq: S): void {
    if (seq.promptLogprobs) seq.handlers.chunk({ text: "", tokenId: -1, promptLogprobs: seq.promptLogprobs });
  }

  /** Takes a sequence out of the index once; false if it already was (answered or failed). */
  private release(seq: S): boolean {
    if (this.byId.get(seq.id) !== seq) return false;
    this.byId.delete(seq.id);
    return true;
  }

  protected finish(seq: S): void {
    this.dropGrammar(seq);
    if (!this.release(seq)) return;
    if (seq.cancelled) seq.sink.finish("cancelled");
    const tail = seq.sink.tail();
    if (tail.text || tail.logprobs) seq.handlers.chunk({ ...tail, tokenId: -1 });
    seq.handlers.done(seq.sink.summary(seq.prompt.length, seq.cached ?? 0));
  }

  protected fail(seq: S, e: unknown): void {
    this.dropGrammar(seq);
    if (this.release(seq)) seq.handlers.failed(e);
  }

  private dropGrammar(seq: S): void {
    seq.grammar?.dispose();
    seq.grammar = null;
  }

  /** Tracks the largest batch; tells the owner the KV bytes at each regroup and at most every 100 ms between. */
  protected noteKv(regrouped = false): void {
    this.peakRows = Math.max(this.peakRows, this.rows);
    const now = performance.now();
    if (regrouped || now - this.lastNote > 100) {
      this.lastNote = now;
      this.onKv(this.kvBytes);
    }
  }
}
