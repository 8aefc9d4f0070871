import type { TextTokenizer } from "../model/tokenizer.ts";
import type { GenerateParams, GenerationChunk, GenerationSummary } from "./generate.ts";
import { TokenSink } from "./generate.ts";
import { type BatchCache, disposeBatch, kvBytesPerToken } from "./kv_batch.ts";
import { Sampler } from "./sampling.ts";
import { asBatch, disposeCache, type KvCache, type ModelSession } from "./session.ts";

/** Prompt tokens prefilled per session run: long prompts are cut so decode steps run in between. */
export const PREFILL_CHUNK = 128;

/** What happens to one sequence's output, in order: chunks, then done or failed. */
export interface SequenceHandlers {
  chunk(c: GenerationChunk): void;
  done(s: GenerationSummary): void;
  failed(e: unknown): void;
}

interface Sequence {
  id: number;
  prompt: number[];
  sink: TokenSink;
  sampler: Sampler;
  history: number[];
  handlers: SequenceHandlers;
  /** Prompt tokens already in `cache`. */
  prefilled: number;
  /** Its own cache while it prefills; null once it is a row of the batch. */
  cache: KvCache | null;
  /** Tokens in its cache. */
  length: number;
  /** The token the next decode step feeds. */
  next: number;
  cancelled: boolean;
}

/**
 * The one owner of a session's sequences (llama.cpp's slots): each turn of its loop runs ONE decode
 * step for every sequence that is decoding, as one batch, then one chunk of the oldest prompt still
 * prefilling. A sequence joins the batch after its prefill and leaves when it finishes, between
 * steps; only then is the batch's cache redrawn (kv_batch.ts), so the steps in between copy nothing
 * on the host. Sampling stays per sequence (its own seeded stream), so what else is in the batch
 * never changes a sequence's draws.
 */
export class BatchEngine {
  private readonly prefilling: Sequence[] = [];
  private readonly joining: Sequence[] = [];
  private batch: { seqs: Sequence[]; cache: BatchCache } | null = null;
  private readonly byId = new Map<number, Sequence>();
  private looping = false;
  readonly bytesPerToken: number;
  /** The largest batch decoded so far, and the KV bytes at their peak (for the load test's check). */
  peakRows = 0;
  peakKvBytes = 0;
  private lastNote = 0;

  constructor(
    private readonly session: ModelSession,
    private readonly tokenizer: TextTokenizer,
    private readonly eosTokenIds: number[],
    private readonly maxPositions: number,
    private readonly onKv: (bytes: number) => void = () => {},
  ) {
    this.bytesPerToken = kvBytesPerToken(session.graph);
  }

  /** KV bytes held now: the batch's padded rows and the caches of prompts being prefilled. */
  get kvBytes(): number {
    const rows = this.batch ? this.batch.seqs.length * this.batch.cache.width : 0;
    const own = [...this.prefilling, ...this.joining].reduce((n, s) => n + (s.cache?.length ?? 0), 0);
    return (rows + own) * this.bytesPerToken;
  }

  submit(id: number, promptIds: number[], params: GenerateParams, handlers: SequenceHandlers): void {
    if (promptIds.length === 0) {
      handlers.failed(new Error("generate needs at least one prompt token"));
      return;
    }
    const seq: Sequence = {
      id,
      prompt: promptIds,
      sink: new TokenSink(this.tokenizer, params, this.eosTokenIds),
      sampler: new Sampler(params),
      history: [...promptIds],
      handlers,
      prefilled: 0,
      cache: null,
      length: 0,
      next: -1,
      cancelled: false,
    };
    this.byId.set(id, seq);
    this.prefilling.push(seq);
    void this.loop();
  }

  /** Ends a sequence at the next turn (finish reason "cancelled"). */
  cancel(id: number): void {
    const seq = this.byId.get(id);
    if (seq) seq.cancelled = true;
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
      while (this.prefilling.length || this.joining.length || this.batch) {
        await this.regroup();
        if (this.batch) await this.decodeStep();
        // Prompt tokens up to one chunk per turn: many short prompts join together, a long one is cut.
        for (let budget = PREFILL_CHUNK; budget > 0 && this.prefilling.length;) {
          budget -= await this.prefillChunk(budget);
        }
      }
      this.noteKv(true);
    } finally {
      this.looping = false;
    }
  }

  /** Takes finished rows out and prefilled sequences in: the only time the batch cache is copied. */
  private async regroup(): Promise<void> {
    const stay = this.batch?.seqs.filter((s) => !this.ended(s)) ?? [];
    const leaving = this.batch?.seqs.filter((s) => this.ended(s)) ?? [];
    const joining = this.joining.splice(0).filter((s) => {
      if (!this.ended(s)) return true;
      disposeCache(s.cache!);
      this.finish(s);
      return false;
    });
    if (!leaving.length && !joining.length) return;
    const old = this.batch;
    const sources = [
      ...stay.map((s) => ({ cache: old!.cache, row: old!.seqs.indexOf(s) })),
      ...joining.map((s) => ({ cache: asBatch(s.cache!), row: 0 })),
    ];
    try {
      const cache = sources.length ? await this.session.packRows(sources) : null;
      this.batch = cache ? { seqs: [...stay, ...joining], cache } : null;
    } catch (e) {
      this.batch = null;
      for (const s of [...stay, ...joining]) this.fail(s, e);
    } finally {
      if (old) disposeBatch(old.cache);
      for (const s of joining) {
        disposeCache(s.cache!);
        s.cache = null;
      }
      for (const s of leaving) this.finish(s);
    }
    this.noteKv(true);
  }

  private async decodeStep(): Promise<void> {
    const batch = this.batch!;
    try {
      const r = await this.session.decodeBatch(batch.seqs.map((s) => s.next), batch.cache);
      batch.cache = r.cache;
      const vocab = this.session.vocabSize;
      batch.seqs.forEach((s, b) => {
        s.length++;
        if (s.cancelled) return;
        this.take(s, r.logits.subarray(b * vocab, (b + 1) * vocab));
        // Answered now; its row leaves the batch at the next regroup.
        if (this.ended(s)) this.finish(s);
      });
    } catch (e) {
      this.batch = null;
      disposeBatch(batch.cache);
      for (const s of batch.seqs) this.fail(s, e);
    }
    this.noteKv();
  }

  /** Prefills up to `budget` tokens of the oldest prompt; returns how many it ran (at least one). */
  private async prefillChunk(budget: number): Promise<number> {
    const seq = this.prefilling[0];
    if (seq.cancelled) {
      this.prefilling.shift();
      if (seq.cache) disposeCache(seq.cache);
      this.finish(seq);
      return 1;
    }
    const chunk = seq.prompt.slice(seq.prefilled, seq.prefilled + budget);
    try {
      const r = await this.session.step(chunk, seq.cache ?? this.session.emptyCache());
      seq.cache = r.cache;
      seq.prefilled += chunk.length;
      seq.length = seq.prefilled;
      if (seq.prefilled < seq.prompt.length) return chunk.length;
      this.prefilling.shift();
      const vocab = this.session.vocabSize;
      this.take(seq, r.logits.subarray(r.logits.length - vocab));
      if (this.ended(seq)) {
        disposeCache(seq.cache);
        seq.cache = null;
        this.finish(seq);
      } else this.joining.push(seq);
    } catch (e) {
      this.prefilling.shift();
      if (seq.cache) disposeCache(seq.cache);
      this.fail(seq, e);
    }
    return chunk.length;
  }

  /** Chooses the sequence's next token from its row of logits and hands on the text it makes final. */
  private take(seq: Sequence, row: Float32Array): void {
    const id = seq.sampler.next(row, seq.history);
    seq.history.push(id);
    seq.next = id;
    const text = seq.sink.push(id);
    if (text) seq.handlers.chunk({ text, tokenId: id });
  }

  /** Done sampling: end of sequence, stop sequence, length, a full context, or cancelled. */
  private ended(seq: Sequence): boolean {
    return seq.cancelled || seq.sink.done || seq.length + 1 >= this.maxPositions;
  }

  private finish(seq: Sequence): void {
    if (!this.byId.delete(seq.id)) return;
    if (seq.cancelled) seq.sink.finish("cancelled");
    const tail = seq.sink.tail();
    if (tail) seq.handlers.chunk({ text: tail, tokenId: -1 });
    seq.handlers.done(seq.sink.summary(seq.prompt.length));
  }

  private fail(seq: Sequence, e: unknown): void {
    if (this.byId.delete(seq.id)) seq.handlers.failed(e);
  }

  /** Tracks the peaks; tells the owner at each regroup and at most every 100 ms in between. */
  private noteKv(regrouped = false): void {
    const bytes = this.kvBytes;
    this.peakKvBytes = Math.max(this.peakKvBytes, bytes);
    this.peakRows = Math.max(this.peakRows, this.batch?.seqs.length ?? 0);
    const now = performance.now();
    if (regrouped || now - this.lastNote > 100) {
      this.lastNote = now;
      this.onKv(bytes);
    }
  }
}
