import type { TextTokenizer } from "../model/tokenizer.ts";
import type { DecoderGraph } from "../onnx/decoder.ts";
import { commonPrefix, EngineBase, PREFILL_CHUNK, type Sequence } from "./engine_base.ts";
import {
  type BatchCache,
  type BatchRoom,
  bufferOf,
  disposeBatch,
  freeBatch,
  kvBytesPerToken,
  roomFor,
  type RowSource,
} from "../ort/kv_batch.ts";
import { describe } from "../sampling/logprobs.ts";
import { Sampler } from "../sampling/sampling.ts";
import { freeHostArray } from "../free_memory.ts";
import type { ModelSession } from "../ort/session.ts";

/** Decode steps a prefilled sequence waits at most for others to join with it. */
const JOIN_WAIT_STEPS = 3;

/**
 * While rows decode, a turn's prefill takes about this long at most, or one decode step's time where
 * that is longer: the rows' next tokens wait for it (a 128-token chunk of a prompt asking for its
 * logprobs after 768 cached positions took ~120 ms on WASM at tiny-nas's shape).
 */
export const PREFILL_TURN_MS = 40;

/** Weight of the latest run in the running means of prefill and step times. */
const MEAN_WEIGHT = 0.3;

/**
 * Cache bytes one regroup copies into a batch's room at most (one joiner at least): 8 rows of 800
 * positions joining at once took 100-190 ms to copy into fresh memory on this 2-core VM, a wait
 * for every stream in the batch; spread over turns, the joiners wait a few steps for their second token.
 */
export const JOIN_COPY_BYTES = 8 << 20;

/** Tokens a finished sequence may add to a kept prefix and still not be kept itself (see keep). */
const NEAR_PREFIX_TOKENS = 16;

/**
 * Transient bytes one prefill run may hold for its positions (see DecoderGraph.rowBytes): about what a
 * decode step of 8 rows already holds at the 1B shape on WASM's integer path (the head's block sums, 8.2
 * MB a row), so a prompt's run does not raise the heap's high-water mark above the steps'
 * (bench/results/2026-12-05-cpu-llama-3.2-1b-wasm-prefill-bytes.txt).
 */
const PREFILL_TRANSIENT_BYTES = 64 << 20;

/**
 * Positions one prefill run of `rows` prompts takes (padding included): PREFILL_CHUNK, or fewer where
 * each holds much memory while it runs. WASM's integer path holds ~4 MB of block sums a position at the
 * 1B shape: 128 positions would take 0.5 GB of heap (which the heap keeps for good); 14 take 64 MB.
 */
export function prefillLimit(rowBytes: DecoderGraph["rowBytes"], allLogits: boolean, rows = 1): number {
  const perToken = rowBytes.position + (allLogits ? rowBytes.logits : 0);
  if (perToken === 0) return PREFILL_CHUNK;
  const room = PREFILL_TRANSIENT_BYTES - (allLogits ? 0 : rows * rowBytes.logits);
  return Math.max(1, Math.min(PREFILL_CHUNK, Math.floor(room / perToken)));
}

/**
 * Padding a prefill run of several prompts may hold, against its real tokens: a quarter more work
 * at most, for a run saved (each run reads every weight once: 8 ten-token prompts took 305-412 ms in
 * one run on the 1B shape's native int4 graph against 442-494 in eight).
 */
export const PADDING_SHARE = 0.25;

/** A prompt's place in a prefill run: its tokens this run. */
export interface RunRow {
  tokens: number;
}

/**
 * Whether a prefill run of `rows` (their tokens), padded to the longest, stays within `positions`
 * and PADDING_SHARE.
 */
export function runFits(rows: RunRow[], positions: number): boolean {
  const real = rows.reduce((n, r) => n + r.tokens, 0);
  const padded = rows.length * Math.max(...rows.map((r) => r.tokens));
  return padded <= positions && padded - real <= PADDING_SHARE * real;
}

/** How long a turn may prefill: no limit when nothing decodes, else PREFILL_TURN_MS or one decode step. */
export function turnPrefillMs(decoding: boolean, stepMs: number): number {
  return decoding ? Math.max(PREFILL_TURN_MS, stepMs) : Infinity;
}

/**
 * Prompt tokens the next prefill run of a turn takes, with `ms` of the turn left at `msPerToken`: a
 * whole chunk when nothing is measured yet or no time limit holds, at least one.
 */
export function runPrefillTokens(msPerToken: number, ms: number): number {
  if (msPerToken === 0 || ms === Infinity) return PREFILL_CHUNK;
  return Math.max(1, Math.min(PREFILL_CHUNK, Math.floor(ms / msPerToken)));
}

/**
 * How many of the joiners, shortest first (their caches' `lengths`, ascending, `bytesPerToken` each), a
 * regroup takes: as many as JOIN_COPY_BYTES of cache (at least one), so that copying them does not
 * hold a step up, the cheapest first so that a stream's second token does not wait behind long rows;
 * all of them where the batch (`rows` staying, its `width` and `capacity`) must be redrawn anyway: a
 * joiner wider than its rows, or no room left.
 */
export function joinersTaken(
  lengths: number[],
  bytesPerToken: number,
  batch: BatchRoom | null,
): number {
  let n = 1;
  let total = lengths[0] * bytesPerToken;
  while (n < lengths.length && total + lengths[n] * bytesPerToken <= JOIN_COPY_BYTES) {
    total += lengths[n++] * bytesPerToken;
  }
  const redrawn = batch !== null && !roomFor(batch, n, lengths[n - 1]);
  return redrawn ? lengths.length : n;
}

/** A running mean's next value: the first sample as it is. */
function mean(previous: number, sample: number): number {
  return previous === 0 ? sample : previous + MEAN_WEIGHT * (sample - previous);
}

interface HostSequence extends Sequence {
  sampler: Sampler;
  history: number[];
  /**
   * Its row while it prefills or waits to join: a row of its last prefill run's cache, which the
   * prompts prefilled beside it share; null once it is a row of the batch.
   */
  cache: RowSource | null;
  /** Tokens in its cache. */
  length: number;
  /** The token the next decode step feeds. */
  next: number;
  /** The engine's step count when its prefill ended. */
  prefilledAt: number;
}

/** A finished sequence's cache, kept for a later prompt that starts with the same tokens. */
interface KeptPrefix {
  /** The tokens whose keys and values `cache` (one row) holds, in order. */
  ids: number[];
  cache: BatchCache;
}

/**
 * The engine of a session whose caches live on the host (WASM, native CPU): each turn of its loop runs ONE decode
 * step for every sequence that is decoding, as one batch, then a chunk of the oldest prompts still
 * prefilling (less while rows decode: turnPrefillMs), short prompts side by side in one run
 * (runRows), the logits read back and every token chosen on the host. A sequence joins the batch after its prefill and leaves when it finishes, between
 * steps; only then are rows of the batch's cache moved (kv_batch.ts), so the steps in between copy
 * nothing on the host. Sampling stays per sequence (its own seeded stream), so what else is in the batch
 * never changes a sequence's draws.
 *
 * Prefix reuse: before its prefill, a prompt looks for the longest run of its first tokens already
 * in a cache (a row decoding now, a prompt just prefilled, or a finished sequence kept, least recently
 * used first out, within `prefixBytes` and within `keepBytes` beside what the live sequences hold) and
 * prefills only the rest.
 * The same prompt sent n times prefills once: the copies waiting when it is in fork from it (fork).
 */
export class BatchEngine extends EngineBase<HostSequence> {
  private readonly joining: HostSequence[] = [];
  /** The rows decoding, and `held`: the most its buffers have held since they were drawn (see liveBytes). */
  private batch: { seqs: HostSequence[]; cache: BatchCache; held: number } | null = null;
  private readonly kept: KeptPrefix[] = [];
  readonly bytesPerToken: number;
  /** Decode steps run so far. */
  private steps = 0;
  /** Running means of a prefill run's ms per prompt token and of a decode step's ms; 0 until measured. */
  private prefillMs = 0;
  private stepMs = 0;

  constructor(
    private readonly session: ModelSession,
    tokenizer: TextTokenizer,
    eosTokenIds: number[],
    maxPositions: number,
    onKv: (bytes: number) => void = () => {},
    /** KV bytes the live sequences and the kept prefixes may hold together; 0 keeps nothing. */
    private readonly keepBytes = 0,
    /** Sequences the server decodes at once (`--max-active`): the rows a batch keeps room for. */
    private readonly slots = 0,
    /** KV bytes the kept prefixes may hold of `keepBytes` (memory.ts prefixCacheBytes). */
    private readonly prefixBytes = keepBytes,
  ) {
    super(tokenizer, eosTokenIds, maxPositions, onKv);
    this.bytesPerToken = kvBytesPerToken(session.graph);
  }

  protected get vocabSize(): number {
    return this.session.vocabSize;
  }

  /** KV bytes held now: the batch's padded rows, the caches of prompts being prefilled, kept prefixes. */
  get kvBytes(): number {
    return this.liveBytes + this.keptBytes;
  }

  /**
   * A batch's rows count as the most it has held: the room kept beyond them (spareRows) is memory only
   * once a row is written, and stays so after that row leaves.
   */
  private get liveBytes(): number {
    const rows = this.batch ? this.batch.held * this.batch.cache.width : 0;
    const own = [...this.prefilling, ...this.joining].reduce((n, s) => n + (s.cache ? s.length : 0), 0);
    return (rows + own) * this.bytesPerToken;
  }

  private get keptBytes(): number {
    return this.kept.reduce((n, k) => n + k.ids.length, 0) * this.bytesPerToken;
  }

  protected start(seq: Sequence): HostSequence {
    return {
      ...seq,
      sampler: new Sampler(seq.params),
      history: [...seq.prompt],
      cache: null,
      length: 0,
      next: -1,
      prefilledAt: 0,
    };
  }

  protected get busy(): boolean {
    return this.prefilling.length > 0 || this.joining.length > 0 || this.batch !== null;
  }

  protected get rows(): number {
    return this.batch?.seqs.length ?? 0;
  }

  protected async turn(): Promise<void> {
    await this.regroup();
    if (this.batch) await this.decodeStep();
    // Prompt tokens up to one chunk a turn: many short prompts join together, a long one is cut. While
    // rows decode the turn also ends on the clock, whatever the runs were expected to cost: a run's cost
    // is not its tokens' (a one-token run over 800 cached positions took 5-30 ms on tiny-nas against
    // ~1.5 ms a token in whole chunks), and runs of several prompts could add up to 180 ms.
    const until = performance.now() + turnPrefillMs(this.batch !== null, this.stepMs);
    for (let budget = PREFILL_CHUNK; budget > 0 && this.prefilling.length && this.mayPrefill;) {
      const left = until - performance.now();
      if (left <= 0 && budget < PREFILL_CHUNK) break;
      budget -= await this.prefillRun(Math.min(budget, runPrefillTokens(this.prefillMs, left)));
    }
  }

  /**
   * Takes finished rows out and prefilled sequences in: the only time the batch cache is copied (the
   * rows that move, where steps write in place; the whole batch elsewhere).
   */
  private async regroup(): Promise<void> {
    const stay = this.batch?.seqs.filter((s) => !this.ended(s)) ?? [];
    const leaving = this.batch?.seqs.filter((s) => this.ended(s)) ?? [];
    // A redraw (joiners longer than the rows are wide, or more than the buffers hold) copies every
    // row, so joins that need one wait for company: a leave, a second joiner, or a few steps (their
    // first token is already out; only their second waits). One that fits joins at once.
    const due = leaving.length || this.joining.length >= 2 || !this.batch ||
      this.joining.some((s) => this.steps - s.prefilledAt >= JOIN_WAIT_STEPS || this.fits(s, stay.length));
    const joining = (due && this.joining.length ? this.takeJoiners(stay.length) : []).filter((s) => {
      if (!this.ended(s)) return true;
      s.cache = null;
      this.finish(s);
      return false;
    });
    if (!leaving.length && !joining.length) return;
    const old = this.batch;
    try {
      if (old && this.keepBytes > 0) {
        for (const s of leaving) {
          await this.keep(s.history.slice(0, s.length), old.cache, old.seqs.indexOf(s));
        }
      }
      const all = [...old?.seqs ?? [], ...joining];
      const width = this.widthLimit([...stay, ...joining]);
      const { cache, from, redrawn } = await this.session.regroupRows(
        old?.cache ?? null,
        leaving.map((s) => old!.seqs.indexOf(s)),
        joining.map((s) => s.cache!),
        width,
        this.spareRows(stay.length + joining.length, width),
      );
      const held = Math.max(from.length, redrawn || !old ? 0 : old.held);
      this.batch = cache ? { seqs: from.map((i) => all[i]), cache, held } : null;
    } catch (e) {
      this.batch = null;
      for (const s of [...stay, ...joining]) this.fail(s, e);
    } finally {
      const joined = joining.map((s) => s.cache?.cache);
      for (const s of joining) s.cache = null;
      // The old batch where it was redrawn and the joiners' caches, copied into the new one.
      this.freeUnheld([old?.cache, ...joined]);
      if (old) disposeBatch(old.cache);
      for (const s of leaving) this.finish(s);
    }
    this.evict();
    this.noteKv(true);
  }

  private async decodeStep(): Promise<void> {
    const batch = this.batch!;
    this.steps++;
    try {
      const t0 = performance.now();
      const drawn = batch.seqs.map((s) => !s.cancelled && this.drawnInGraph(s));
      const rows = batch.seqs.map((_, b) => b).filter((b) => drawn[b]);
      const r = await this.session.decodeBatch(
        batch.seqs.map((s) => s.next),
        batch.cache,
        this.widthLimit(batch.seqs),
        {
          rows,
          inverseTemperature: rows.map((b) => 1 / batch.seqs[b].params.temperature),
          logits: rows.length < batch.seqs.filter((s) => !s.cancelled).length,
        },
      );
      this.stepMs = mean(this.stepMs, performance.now() - t0);
      batch.cache = r.cache;
      const vocab = this.session.vocabSize;
      for (const [b, s] of batch.seqs.entries()) {
        s.length++;
        if (s.cancelled) continue;
        if (r.probs && drawn[b]) {
          const k = rows.indexOf(b);
          this.emit(s, s.sampler.draw(r.probs.subarray(k * vocab, (k + 1) * vocab)));
        } else await this.take(s, r.logits.subarray(b * vocab, (b + 1) * vocab));
        // Answered now; its row leaves the batch at the next regroup.
        if (this.ended(s)) this.finish(s);
      }
      freeHostArray(r.logits);
      if (r.probs) freeHostArray(r.probs);
    } catch (e) {
      this.batch = null;
      disposeBatch(batch.cache);
      for (const s of batch.seqs) this.fail(s, e);
    }
    // The live rows grew by a position each: kept prefixes make room, so the total stays in budget.
    this.evict();
    this.noteKv();
  }

  /** Takes the joiners this regroup joins (see joinersTaken). */
  private takeJoiners(stay: number): HostSequence[] {
    this.joining.sort((a, b) => a.length - b.length);
    const cache = this.batch?.cache;
    const n = joinersTaken(
      this.joining.map((s) => s.length),
      this.bytesPerToken,
      cache ? { rows: stay, width: cache.width, capacity: cache.capacity ?? 0 } : null,
    );
    return this.joining.splice(0, n);
  }

  /** Sequences holding a row or a cache: the batch's rows, those waiting to join, a prompt part prefilled. */
  private get occupied(): number {
    return this.rows + this.joining.length + this.prefilling.filter((s) => s.cache !== null).length;
  }

  /**
   * Whether the oldest prompt may run: it has started (or is cancelled), or fewer than `slots`
   * sequences hold rows, so that a step never decodes more rows than the server decodes at once
   * (`n` choices each take one: three n = 8 answers beside a stream made steps of 23 rows, 296 ms at
   * 800 positions on tiny-nas).
   */
  private get mayPrefill(): boolean {
    const head = this.prefilling[0];
    return !this.slots || head.cache !== null || head.cancelled || this.occupied < this.slots;
  }

  /** Whether `seq` joins the batch (its `rows` staying) without a redraw: room for its row and its length. */
  private fits(seq: HostSequence, rows: number): boolean {
    const cache = this.batch?.cache;
    return !!cache && this.session.inPlace &&
      roomFor({ rows, width: cache.width, capacity: cache.capacity ?? 0 }, 1, seq.length);
  }

  /**
   * Rows beyond `rows` a redrawn batch keeps room for, within the KV budget at `width` positions a row:
   * up to `slots` rows in all, where the server decodes that many at once (a stream that starts later
   * joins without a redraw or a wait; rows never written take address space, not memory), else the
   * sequences prefilling or waiting to join.
   */
  private spareRows(rows: number, width: number): number {
    const spare = this.slots ? Math.max(0, this.slots - rows) : this.prefilling.length + this.joining.length;
    if (this.keepBytes <= 0) return spare;
    return Math.max(0, Math.min(spare, Math.floor(this.keepBytes / (width * this.bytesPerToken)) - rows));
  }

  /**
   * The widest a batch of `seqs` may pad its rows to, where steps write its cache in place: no row
   * grows past its prompt and token limit, and the padded rows stay within the KV budget.
   */
  private widthLimit(seqs: HostSequence[]): number {
    const final = Math.max(
      ...seqs.map((s) => Math.min(this.maxPositions, s.prompt.length + s.params.maxTokens)),
    );
    const budget = this.keepBytes > 0
      ? Math.floor(this.keepBytes / (seqs.length * this.bytesPerToken))
      : Infinity;
    return Math.min(final, budget);
  }

  /**
   * One prefill run of at most `budget` positions: the oldest prompt's next chunk and, in the same run,
   * the next chunks of the prompts after it that fit beside it (runRows). Returns the positions it ran
   * (padding included), at least one.
   */
  private async prefillRun(budget: number): Promise<number> {
    const head = this.prefilling[0];
    if (head.cancelled) {
      this.prefilling.shift();
      head.cache = null;
      this.finish(head);
      return 1;
    }
    if (head.cached === null) await this.reusePrefix(head);
    const rows = await this.runRows(head, budget);
    const seqs = rows.map((r) => r.seq);
    const width = Math.max(...rows.map((r) => r.tokens));
    const all = head.promptLogprobs !== null;
    const maxWidth = this.widthLimit(seqs);
    const earlier = seqs.map((s) => s.cache?.cache);
    let logits: Float32Array | null = null;
    try {
      const t0 = performance.now();
      const r = await this.session.prefillRows(
        rows.map(({ seq, tokens }) => ({
          ids: seq.prompt.slice(seq.prefilled, seq.prefilled + tokens),
          from: seq.cache,
        })),
        all ? "all" : "last",
        maxWidth,
        rows.length + (this.batch ? 0 : this.spareRows(rows.length, maxWidth)),
      );
      logits = r.logits;
      this.prefillMs = mean(this.prefillMs, (performance.now() - t0) / (rows.length * width));
      for (const [row, { seq, tokens }] of rows.entries()) {
        if (all) this.scorePrompt(seq, r.logits, this.vocabSize);
        seq.cache = { cache: r.cache, row };
        seq.prefilled += tokens;
        seq.length = seq.prefilled;
      }
    } catch (e) {
      for (const seq of seqs) {
        this.prefilling.splice(this.prefilling.indexOf(seq), 1);
        seq.cache = null;
        this.fail(seq, e);
      }
      if (logits) freeHostArray(logits);
      this.freeUnheld(earlier);
      return rows.length * width;
    }
    // Where the run needed more room than their earlier cache had, that was copied.
    this.freeUnheld(earlier);
    this.evict();
    const vocab = this.vocabSize;
    for (const [row, seq] of seqs.entries()) {
      if (seq.prefilled < seq.prompt.length) continue;
      this.prefilling.splice(this.prefilling.indexOf(seq), 1);
      try {
        this.sendPromptLogprobs(seq);
        const last = all
          ? logits.subarray(logits.length - vocab)
          : logits.subarray(row * vocab, (row + 1) * vocab);
        await this.fork(seq, last);
        await this.take(seq, last);
        await this.prefilled(seq);
      } catch (e) {
        seq.cache = null;
        this.fail(seq, e);
      }
    }
    freeHostArray(logits);
    return rows.length * width;
  }

  /**
   * The prompts a prefill run of at most `budget` positions takes, with their tokens: `head`'s next
   * chunk, then, where steps write in place, the prompts after it that may run (not cancelled, no
   * prompt logprobs, a slot free), each its next chunk, cut to the run's width or widening it, while
   * the run fits (runFits, prefillLimit). A prompt that shares more than half of what it would run
   * with a prompt taken waits for that one's cache instead (prefix reuse; a copy is forked from it).
   */
  private async runRows(head: HostSequence, budget: number): Promise<(RunRow & { seq: HostSequence })[]> {
    const rowBytes = this.session.graph.rowBytes;
    const left = (s: HostSequence) => s.prompt.length - s.prefilled;
    const cap = Math.min(budget, prefillLimit(rowBytes, head.promptLogprobs !== null));
    const rows = [{ seq: head, tokens: Math.min(left(head), cap) }];
    if (!this.session.inPlace || head.promptLogprobs) return rows;
    let free = this.slots ? this.slots - this.occupied - (head.cache ? 0 : 1) : Infinity;
    for (const seq of this.prefilling.slice(1)) {
      const held = seq.cache !== null;
      if (seq.cancelled || seq.promptLogprobs || (!held && free <= 0)) continue;
      const shared = Math.max(...rows.map((r) => commonPrefix(seq.prompt, r.seq.prompt))) - seq.prefilled;
      if (2 * shared > left(seq)) continue;
      const positions = Math.min(budget, prefillLimit(rowBytes, false, rows.length + 1));
      const width = Math.max(...rows.map((r) => r.tokens));
      // Its whole chunk widens the run; cut to the run's width, it runs the rest later.
      const whole = Math.min(left(seq), cap);
      const fitting = [whole, Math.min(whole, width)].find((t) =>
        runFits([...rows, { tokens: t }], positions)
      );
      if (fitting === undefined) continue;
      if (seq.cached === null) await this.reusePrefix(seq);
      const tokens = Math.min(left(seq), fitting);
      const taken = runFits([...rows, { tokens }], positions);
      if (!held && (taken || seq.cache)) free--;
      if (taken) rows.push({ seq, tokens });
    }
    return rows;
  }

  /** A sequence whose prompt is in its cache and whose first token is chosen: answered, or waiting to join. */
  private async prefilled(seq: HostSequence): Promise<void> {
    if (this.ended(seq)) {
      const cache = seq.cache!.cache;
      if (this.keepBytes > 0) await this.keep(seq.prompt, cache, seq.cache!.row);
      seq.cache = null;
      this.freeUnheld([cache]);
      this.finish(seq);
    } else {
      seq.prefilledAt = this.steps;
      this.joining.push(seq);
    }
  }

  /**
   * Starts the prompts waiting that are `seq`'s prompt exactly (the other choices of an n > 1 request,
   * or the same prompt sent again) from its prefill, as vLLM forks a parallel-sampling request once its
   * prompt is in: a copy of its cache each, and their first tokens drawn from its last logits (each
   * with its own sampler), where prefix reuse would run the last prompt token again over the whole
   * context for each of them. Called before `seq` takes its token, which may mask `last` in place.
   */
  private async fork(seq: HostSequence, last: Float32Array): Promise<void> {
    // As many as there are free slots (mayPrefill; `seq` takes one); the others wait their turn.
    const room = this.slots ? this.slots - this.occupied - 1 : Infinity;
    const twins = this.prefilling.filter((t) =>
      t.cached === null && !t.cancelled && !t.promptLogprobs && isCopy(t, seq)
    )
      .slice(0, Math.max(0, room));
    if (!twins.length) return;
    const rows = twins.map(() => last.slice());
    for (const [i, twin] of twins.entries()) {
      this.prefilling.splice(this.prefilling.indexOf(twin), 1);
      try {
        const copy = await this.session.packRows([{ ...seq.cache!, length: seq.length }]);
        twin.cache = { cache: copy, row: 0 };
        twin.prefilled = twin.length = twin.cached = seq.length;
        await this.take(twin, rows[i]);
        await this.prefilled(twin);
      } catch (e) {
        twin.cache = null;
        this.fail(twin, e);
      }
    }
    this.evict();
  }

  /** Keeps a copy of the first `ids.length` positions of row `row` of `cache` for later prompts. */
  private async keep(ids: number[], cache: BatchCache, row: number): Promise<void> {
    if (ids.length < 2 || ids.length * this.bytesPerToken > Math.min(this.keepBytes, this.prefixBytes)) {
      return;
    }
    // A kept prefix that this one extends is redundant.
    const covered = this.kept.findIndex((k) =>
      k.ids.length <= ids.length && commonPrefix(k.ids, ids) === k.ids.length
    );
    // One that adds little to a kept one (the other choices of an n > 1 request: the same prompt, a
    // few sampled tokens apart) is not worth its copy: a later prompt re-prefills at most those tokens.
    const slack = Math.max(NEAR_PREFIX_TOKENS, ids.length >> 3);
    if (covered >= 0) freeBatch(this.kept.splice(covered, 1)[0].cache);
    else if (this.kept.some((k) => ids.length - commonPrefix(k.ids, ids) <= slack)) return;
    this.kept.push({ ids, cache: await this.session.packRows([{ cache, row, length: ids.length }]) });
    this.evict();
  }

  /**
   * Frees those of `caches` whose buffers no sequence, batch or kept prefix holds now (see bufferOf):
   * a batch redrawn, the caches of joiners copied into it, a prompt's cache its next run outgrew or
   * its answer ended. At 1B widths each is tens to hundreds of MB, and V8 collected them late, after
   * the next was drawn beside them (8 streams of 128 tokens peaked 80-130 MB higher).
   */
  private freeUnheld(caches: (BatchCache | null | undefined)[]): void {
    const held = new Set<ArrayBufferLike>();
    const hold = (c: BatchCache | null | undefined) => {
      const b = c && bufferOf(c);
      if (b) held.add(b);
    };
    hold(this.batch?.cache);
    for (const s of [...this.prefilling, ...this.joining]) hold(s.cache?.cache);
    for (const k of this.kept) hold(k.cache);
    for (const c of new Set(caches)) {
      const b = c && bufferOf(c);
      if (!b || held.has(b)) continue;
      held.add(b);
      freeBatch(c);
    }
  }

  /** Drops the least recently used prefixes until live and kept bytes fit `keepBytes`, kept ones `prefixBytes`. */
  private evict(): void {
    const over = () => this.liveBytes + this.keptBytes > this.keepBytes || this.keptBytes > this.prefixBytes;
    while (this.kept.length && over()) {
      freeBatch(this.kept.shift()!.cache);
    }
  }

  /**
   * Starts `seq` from the longest cached run of its prompt's first tokens (all but the last, whose
   * logits the prefill must produce): a kept prefix, a row decoding now, or a prompt prefilled and
   * waiting to join.
   */
  private async reusePrefix(seq: HostSequence): Promise<void> {
    seq.cached = 0;
    // Prompt logprobs need every position's logits: the whole prompt is prefilled.
    if (this.keepBytes <= 0 || seq.promptLogprobs) return;
    const limit = seq.prompt.length - 1;
    let best: { n: number; source: RowSource; kept?: KeptPrefix } | null = null;
    const consider = (ids: number[], source: RowSource, kept?: KeptPrefix) => {
      const n = Math.min(commonPrefix(ids, seq.prompt), limit);
      if (n > (best?.n ?? 0)) best = { n, source, kept };
    };
    for (const k of this.kept) consider(k.ids, { cache: k.cache, row: 0 }, k);
    this.batch?.seqs.forEach((s, row) =>
      consider(s.history.slice(0, s.length), { cache: this.batch!.cache, row })
    );
    for (const s of this.joining) consider(s.prompt, s.cache!);
    const found = best as { n: number; source: RowSource; kept?: KeptPrefix } | null;
    if (!found || found.n < 1) return;
    if (found.kept) this.kept.push(...this.kept.splice(this.kept.indexOf(found.kept), 1)); // most recently used
    const copy = await this.session.packRows([{ ...found.source, length: found.n }]);
    seq.cache = { cache: copy, row: 0 };
    seq.prefilled = seq.length = seq.cached = found.n;
    this.evict();
  }

  /**
   * Chooses the sequence's next token from its row of logits (those its grammar allows, when it has
   * one) and hands on the text it makes final.
   */
  private async take(seq: HostSequence, row: Float32Array): Promise<void> {
    await (await this.grammarOf(seq))?.mask(row);
    this.emit(seq, seq.sampler.next(row, seq.history));
  }

  /**
   * Whether a step draws `seq`'s next token from the graph's exponentials: plain temperature sampling,
   * no grammar, no logprobs (which read the row itself).
   */
  private drawnInGraph(seq: HostSequence): boolean {
    return this.session.graph.sampling && seq.sampler.plain && !seq.params.grammar &&
      seq.logprobs === undefined;
  }

  /** Takes `id` as the sequence's next token and hands on the text it makes final. */
  private emit(seq: HostSequence, id: number): void {
    seq.grammar?.accept(id);
    seq.history.push(id);
    seq.next = id;
    const scored = seq.logprobs === undefined
      ? undefined
      : describe(this.tokenizer, id, seq.sampler.score(id, seq.logprobs));
    const out = seq.sink.push(id, scored);
    if (out.text) seq.handlers.chunk({ ...out, tokenId: id });
  }

  /** Done sampling: end of sequence, stop sequence, length, a full context, or cancelled. */
  private ended(seq: HostSequence): boolean {
    return seq.cancelled || seq.sink.done || seq.length + 1 >= this.maxPositions;
  }
}

/** Whether `a`'s prompt is `b`'s exactly (another choice of an n > 1 request, or the same prompt again). */
function isCopy(a: Sequence, b: Sequence): boolean {
  return a.prompt.length === b.prompt.length && commonPrefix(a.prompt, b.prompt) === a.prompt.length;
}
