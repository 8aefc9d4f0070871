import type { TextTokenizer } from "../model/tokenizer.ts";
import { commonPrefix, EngineBase, PREFILL_CHUNK, type Sequence } from "./engine_base.ts";
import { RING, ringId, ringScored, type RingSnapshot } from "../ort/gpu_sampler.ts";
import { kvBytesPerToken } from "../ort/kv_batch.ts";
import { describe } from "../sampling/logprobs.ts";
import type { SlotDecoder } from "../ort/slot_decoder.ts";

interface GpuSequence extends Sequence {
  /** The seed its draws hash from (the request's, or one chosen for it). */
  seed: number;
  /** Its KV slot from the end of its prefill; -1 before. */
  slot: number;
  /** Tokens in its slot's cache. */
  length: number;
  /** Tokens the GPU has chosen for it so far, and how many of those the host has taken. */
  produced: number;
  read: number;
  /** Every chosen id read back, in order (with the prompt, what its cache holds). */
  outputs: number[];
  /** No more steps: its length or the context is reached, or its text ended. */
  stopped: boolean;
  /** Under a grammar: the output index its slot's mask is for (it steps only when that is `produced`). */
  maskedFor: number;
}

/** What a slot holds when no sequence decodes in it: nothing, or a finished sequence's cache kept for reuse. */
interface SlotContent {
  /** The tokens whose keys and values the slot holds (empty: nothing). */
  ids: number[];
  lastUse: number;
}

/**
 * The engine of a SlotDecoder (WebGPU): each sequence owns a KV slot from the end of its prefill
 * until it ends, tokens are chosen on the GPU and written where the next step reads them, so a
 * decode step waits for nothing from the GPU. The host learns the ids by reading the slots' rings
 * back in the background, one readback in flight at a time (each costs >= 11 ms under Deno), and
 * hands the text on as it comes; a sequence that ends on a token (end of sequence, a stop string) is
 * found at that readback, a few steps after the GPU chose it, and the steps it ran beyond are
 * dropped. Lengths and the context are known on the host and stop a sequence at once.
 *
 * A finished sequence's slot keeps its cache (`keep`) until another sequence needs the slot, least
 * recently used first: a later prompt that starts with the same tokens copies them into its prefill.
 */
export class GpuBatchEngine extends EngineBase<GpuSequence> {
  readonly bytesPerToken: number;
  private readonly decoding: GpuSequence[] = [];
  private readonly contents: SlotContent[];
  private pending: Promise<void> | null = null;
  private clock = 0;

  constructor(
    private readonly decoder: SlotDecoder,
    tokenizer: TextTokenizer,
    eosTokenIds: number[],
    maxPositions: number,
    onKv: (bytes: number) => void = () => {},
    /** Keep finished sequences' caches in their slots for prefix reuse. */
    private readonly keep = false,
  ) {
    super(tokenizer, eosTokenIds, Math.min(maxPositions, decoder.layout.capacity), onKv);
    this.bytesPerToken = kvBytesPerToken(decoder.graph);
    this.contents = Array.from({ length: decoder.layout.slots }, () => ({ ids: [], lastUse: 0 }));
  }

  get kvBytes(): number {
    const live = this.decoding.reduce((n, s) => n + s.length, 0);
    const kept = this.contents.reduce((n, s) => n + s.ids.length, 0);
    return (live + kept) * this.bytesPerToken;
  }

  protected get vocabSize(): number {
    return this.decoder.vocab;
  }

  protected start(seq: Sequence): GpuSequence {
    return {
      ...seq,
      seed: seq.params.seed ?? Math.floor(Math.random() * 2 ** 32),
      slot: -1,
      length: 0,
      produced: 0,
      read: 0,
      outputs: [],
      stopped: false,
      maskedFor: -1,
    };
  }

  protected get busy(): boolean {
    return this.prefilling.length > 0 || this.decoding.length > 0;
  }

  protected get rows(): number {
    return this.decoding.filter((s) => !s.stopped).length;
  }

  protected async turn(): Promise<void> {
    this.settle();
    const stepping = this.decoding.filter((s) => !s.stopped && !s.cancelled && this.masked(s));
    if (stepping.length) await this.decodeStep(stepping);
    this.startReadback();
    const canPrefill = this.prefilling.length > 0 && (this.prefilling[0].cancelled || this.freeSlot() >= 0);
    if (canPrefill) await this.prefillChunk();
    // Nothing to step: wait for the tokens in flight. Too far ahead of the host: likewise, so a
    // slot's ring never laps the tokens it has not read.
    const ahead = this.decoding.some((s) => s.produced - s.read >= RING - 1);
    if ((!stepping.length && !canPrefill) || ahead) await (this.pending ?? this.startReadback());
  }

  /**
   * Whether a sequence's next token may be drawn: always, unless a grammar constrains it; then only
   * once its last token is read back and the mask that token leads to is in its slot. A constrained
   * row thus waits for a readback each token (>= 11 ms under Deno) while the others step on.
   */
  private masked(s: GpuSequence): boolean {
    return !s.params.grammar || s.maskedFor === s.produced;
  }

  /** Ends what has ended: cancelled sequences at once, others once all their tokens are read. */
  private settle(): void {
    for (const s of [...this.decoding]) {
      const done = s.cancelled || (s.stopped && s.read === s.produced);
      if (!done) continue;
      this.decoding.splice(this.decoding.indexOf(s), 1);
      const slot = this.contents[s.slot];
      slot.ids = this.keep && !s.cancelled ? [...s.prompt, ...s.outputs].slice(0, s.length) : [];
      slot.lastUse = ++this.clock;
      this.finish(s);
    }
    this.noteKv(true);
  }

  /** A slot for the next prefilled sequence: an empty one, else the least recently used kept cache; -1 if none. */
  private freeSlot(): number {
    const busy = new Set(this.decoding.map((s) => s.slot));
    let best = -1;
    this.contents.forEach((slot, i) => {
      if (busy.has(i)) return;
      const empty = slot.ids.length === 0;
      if (best < 0) best = i;
      else if (empty && this.contents[best].ids.length > 0) best = i;
      else if (!empty && this.contents[best].ids.length > 0 && slot.lastUse < this.contents[best].lastUse) {
        best = i;
      }
    });
    return best;
  }

  private async decodeStep(stepping: GpuSequence[]): Promise<void> {
    const lengths = new Map<number, number>();
    // Rows that do not step still take part in the batch: each writes one position just past what
    // its slot holds, where nothing is read.
    this.contents.forEach((slot, i) => lengths.set(i, slot.ids.length));
    for (const s of this.decoding) lengths.set(s.slot, s.length);
    const highest = Math.max(...stepping.map((s) => s.slot));
    const bucket = this.decoder.bucketFor(highest);
    for (const slot of lengths.keys()) if (slot >= bucket) lengths.delete(slot);
    try {
      await this.decoder.decode(lengths, bucket);
      this.decoder.sampler.sample(
        this.decoder.decodeLogits,
        stepping.map((s) => ({
          logitsRow: s.slot,
          slot: s.slot,
          index: s.produced,
          seed: s.seed,
          params: s.params,
          logprobs: s.logprobs,
          masked: s.grammar !== null,
        })),
      );
      for (const s of stepping) {
        s.length++;
        s.produced++;
        this.stopIfDone(s);
      }
    } catch (e) {
      for (const s of stepping) this.failDecoding(s, e);
    }
    this.noteKv();
  }

  /** Stops a sequence at its token limit or the end of its slot (known without reading anything back). */
  private stopIfDone(s: GpuSequence): void {
    if (s.produced >= s.params.maxTokens || s.length + 1 >= this.maxPositions) s.stopped = true;
  }

  /** Starts reading every slot's ring back, unless a readback is in flight or nothing is new. */
  private startReadback(): Promise<void> {
    if (this.pending) return this.pending;
    const due = this.decoding.filter((s) => s.produced > s.read);
    if (!due.length) return Promise.resolve();
    const upTo = new Map(due.map((s) => [s, s.produced]));
    const withLogprobs = due.some((s) => s.logprobs !== undefined);
    const read = this.decoder.sampler.readBack(withLogprobs).then((snap) => this.take(snap, upTo)).catch(
      (e) => {
        for (const s of upTo.keys()) this.failDecoding(s, e);
      },
    );
    this.pending = read.finally(() => (this.pending = null));
    return this.pending;
  }

  /**
   * Hands on the tokens a readback brought, in order, up to where each sequence's text ends; a
   * constrained sequence's grammar takes them and its slot gets the mask of the next.
   */
  private async take(snap: RingSnapshot, upTo: Map<GpuSequence, number>): Promise<void> {
    for (const [s, end] of upTo) {
      if (!this.decoding.includes(s)) continue;
      for (let i = s.read; i < end; i++) {
        const id = ringId(snap, s.slot, i);
        if (s.grammar && !s.grammar.accept(id) && !s.cancelled) {
          // The kernel draws only what the mask allows; a token that gets past it anyway ends the
          // answer with an error rather than send text outside its schema.
          this.failDecoding(
            s,
            new Error(`the GPU drew token ${id} at output ${i}, outside the sequence's grammar`),
          );
          break;
        }
        s.outputs.push(id);
        if (s.sink.done || s.cancelled) continue;
        const scored = s.logprobs === undefined
          ? undefined
          : describe(this.tokenizer, id, ringScored(snap, s.slot, i, s.logprobs));
        const out = s.sink.push(id, scored);
        if (out.text || out.logprobs) s.handlers.chunk({ ...out, tokenId: id });
        if (s.sink.done) s.stopped = true;
      }
      s.read = end;
      if (s.grammar && !s.stopped && !s.cancelled) await this.setMask(s);
    }
  }

  /** Ends a decoding sequence with `e` (one that already ended is left as it is); its slot is free. */
  private failDecoding(s: GpuSequence, e: unknown): void {
    const at = this.decoding.indexOf(s);
    if (at < 0) return;
    this.decoding.splice(at, 1);
    this.fail(s, e);
  }

  /** Writes the mask of the sequence's next token into its slot (unless it ended meanwhile: the slot may be another's). */
  private async setMask(s: GpuSequence): Promise<void> {
    const bits = await s.grammar!.bitmask();
    if (!s.grammar) return;
    this.decoder.sampler.setMask(s.slot, bits);
    s.maskedFor = s.produced;
  }

  /** Prefills up to one chunk of the oldest prompt; its last chunk takes a slot and chooses its first token. */
  private async prefillChunk(): Promise<void> {
    const seq = this.prefilling[0];
    if (seq.cancelled) {
      this.prefilling.shift();
      this.finish(seq);
      return;
    }
    try {
      if (seq.cached === null) this.reusePrefix(seq);
      const chunk = seq.prompt.slice(seq.prefilled, seq.prefilled + PREFILL_CHUNK);
      const logits = await this.decoder.prefill(chunk, seq.prefilled, seq.promptLogprobs ? "all" : "last");
      if (seq.promptLogprobs) this.scorePrompt(seq, logits!, this.decoder.vocab);
      seq.prefilled += chunk.length;
      if (seq.prefilled < seq.prompt.length) return;
      this.prefilling.shift();
      this.sendPromptLogprobs(seq);
      await this.join(seq);
    } catch (e) {
      this.prefilling.shift();
      this.fail(seq, e);
    }
  }

  /** The prefilled sequence takes a slot: its cache is copied in and its first token chosen. */
  private async join(seq: GpuSequence): Promise<void> {
    const grammar = await this.grammarOf(seq);
    const slot = this.freeSlot();
    this.contents[slot].ids = [];
    this.decoder.join(slot, seq.prompt.length);
    seq.slot = slot;
    seq.length = seq.prompt.length;
    this.decoder.sampler.startSequence(slot, seq.prompt, seq.params);
    if (grammar) await this.setMask(seq);
    this.decoder.sampler.sample(this.decoder.prefillLogits, [{
      logitsRow: 0,
      slot,
      index: 0,
      seed: seq.seed,
      params: seq.params,
      logprobs: seq.logprobs,
      masked: grammar !== null,
    }]);
    seq.produced = 1;
    this.decoding.push(seq);
    this.stopIfDone(seq);
    this.noteKv(true);
  }

  /**
   * Starts `seq` from the longest run of its prompt's first tokens (all but the last, whose logits the
   * prefill must produce) that a slot holds: a kept cache, or a sequence decoding now.
   */
  private reusePrefix(seq: GpuSequence): void {
    seq.cached = 0;
    // Prompt logprobs need every position's logits: the whole prompt is prefilled.
    if (!this.keep || seq.promptLogprobs) return;
    const limit = seq.prompt.length - 1;
    let best = { n: 0, slot: -1 };
    const consider = (ids: number[], slot: number) => {
      const n = Math.min(commonPrefix(ids, seq.prompt), limit);
      if (n > best.n) best = { n, slot };
    };
    this.contents.forEach((s, i) => consider(s.ids, i));
    for (const s of this.decoding) consider([...s.prompt, ...s.outputs].slice(0, s.length), s.slot);
    if (best.n < 1) return;
    this.contents[best.slot].lastUse = ++this.clock;
    this.decoder.loadPrefix(best.slot, best.n);
    seq.prefilled = seq.cached = best.n;
  }
}
