import { CancelledError, CapacityError, InputError } from "../errors.ts";

/** The KV-cache budget admission keeps to, and what one token of one sequence costs under the active plan. */
export interface KvBudget {
  budgetBytes: number;
  bytesPerToken(): number;
  /**
   * Tokens one sequence can hold when the active plan's cache is a pool of fixed slots (WebGPU), which
   * the budget was divided into when the plan was built; null when caches grow as needed.
   */
  slotTokens?(): number | null;
}

const mb = (b: number) => `${(b / 2 ** 20).toFixed(1)} MB`;

/**
 * Puts `waiter` at the back of `line`. When `signal` aborts before it is granted (or already has),
 * it leaves the line and `reject` gets a CancelledError; `after` then lets the rest move up.
 */
function waitInLine<W>(
  line: W[],
  waiter: W,
  reject: (e: Error) => void,
  signal: AbortSignal | undefined,
  why: string,
  after?: () => void,
): void {
  if (signal?.aborted) return reject(new CancelledError(why));
  line.push(waiter);
  signal?.addEventListener("abort", () => {
    const at = line.indexOf(waiter);
    if (at < 0) return;
    line.splice(at, 1);
    reject(new CancelledError(why));
    after?.();
  }, { once: true });
}

/**
 * Admission control in front of the shared session. Up to `maxActive` generations decode at once,
 * their steps interleaved one by one on the session (each owns its KV cache), so a long completion
 * never blocks a short one; up to `maxQueue` more wait in FIFO order; past that, 429. Interleaving
 * keeps time-to-first-token fair under load; the bound on active streams keeps per-token latency
 * and KV-cache memory bounded.
 */
export class Scheduler {
  private running = 0;
  private readonly waiting: { grant: () => void; reject: (e: Error) => void }[] = [];
  private readonly idleWaiters: (() => void)[] = [];
  /** Tokens of KV each admitted sequence may grow to (prompt + max_tokens). */
  private readonly reserved = new Set<{ tokens: number }>();
  private readonly kvWaiting: { tokens: number; grant: () => void }[] = [];

  constructor(readonly maxActive: number, readonly maxQueue: number, readonly kv: KvBudget | null = null) {}

  /**
   * KV bytes the admitted sequences can grow to when they decode as one batch: rows padded to the
   * longest (kv_batch.ts), so every row counts at the longest reservation.
   */
  kvReservedBytes(extra = 0): number {
    const tokens = [...this.reserved].map((r) => r.tokens);
    if (extra) tokens.push(extra);
    return tokens.length * Math.max(0, ...tokens) * (this.kv?.bytesPerToken() ?? 0);
  }

  /**
   * Reserves the KV memory a sequence can grow to (`tokens`, prompt + max_tokens), waiting in FIFO
   * order until the batch fits the budget; resolves with the function that gives it back. A sequence
   * that could never fit is an InputError naming the sizes. `prompt` is its prompt's length and the
   * field it came in.
   */
  reserveKv(
    tokens: number,
    signal?: AbortSignal,
    prompt?: { tokens: number; field: string },
  ): Promise<() => void> {
    if (!this.kv) return Promise.resolve(() => {});
    const slot = this.kv.slotTokens?.() ?? null;
    if (slot !== null) return this.reserveSlot(Math.min(tokens, slot), slot, prompt);
    const need = tokens * this.kv.bytesPerToken();
    if (need > this.kv.budgetBytes) {
      return Promise.reject(
        new InputError(
          `${tokens} tokens (prompt + max_tokens) need ${mb(need)} of KV cache, more than the whole ` +
            `budget of ${mb(this.kv.budgetBytes)} (--kv-cache-mb); lower max_tokens or shorten the prompt`,
          "max_tokens",
        ),
      );
    }
    const entry = { tokens };
    const release = () => {
      if (!this.reserved.delete(entry)) return;
      this.pumpKv();
    };
    if (!this.kvWaiting.length && this.fitsKv(tokens)) {
      this.reserved.add(entry);
      return Promise.resolve(release);
    }
    return new Promise((resolve, reject) => {
      const grant = () => {
        this.reserved.add(entry);
        resolve(release);
      };
      waitInLine(
        this.kvWaiting,
        { tokens, grant },
        reject,
        signal,
        "request was cancelled while waiting for KV-cache memory",
        () => this.pumpKv(),
      );
    });
  }

  /**
   * A static cache's memory is held whatever runs, so admission only checks that the prompt fits one
   * slot, which is the sequence's context: its output stops at the slot's end as at the model's.
   * Sequences beyond the slots wait in the engine for one to free.
   */
  private reserveSlot(
    tokens: number,
    slot: number,
    prompt?: { tokens: number; field: string },
  ): Promise<() => void> {
    if (prompt && prompt.tokens + 1 > slot) {
      return Promise.reject(
        new InputError(
          `${prompt.tokens} prompt tokens and one generated do not fit a KV slot of ${slot} tokens (the ` +
            `KV budget of ${mb(this.kv!.budgetBytes)} divided among the sequences that decode at once: ` +
            "raise --kv-cache-mb or lower --max-active); shorten the prompt",
          prompt.field,
        ),
      );
    }
    const entry = { tokens };
    this.reserved.add(entry);
    return Promise.resolve(() => void this.reserved.delete(entry));
  }

  private fitsKv(tokens: number): boolean {
    return this.kvReservedBytes(tokens) <= this.kv!.budgetBytes;
  }

  private pumpKv(): void {
    while (this.kvWaiting.length && this.fitsKv(this.kvWaiting[0].tokens)) this.kvWaiting.shift()!.grant();
  }

  /** Resolves once nothing is running or queued (shutdown waits on this to drain). */
  idle(): Promise<void> {
    if (this.running === 0 && this.waiting.length === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  get active(): number {
    return this.running;
  }

  get queued(): number {
    return this.waiting.length;
  }

  /**
   * Resolves with a release function once a slot is free; rejects at once when the queue is full,
   * and with a CancelledError, leaving the queue, when `signal` aborts while waiting.
   */
  acquire(signal?: AbortSignal): Promise<() => void> {
    const release = () => {
      this.running--;
      const next = this.waiting.shift();
      if (next) next.grant();
      else if (this.running === 0) { for (const wake of this.idleWaiters.splice(0)) wake(); }
    };
    let released = false;
    const once = () => {
      if (!released) {
        released = true;
        release();
      }
    };
    if (signal?.aborted) return Promise.reject(new CancelledError("request was cancelled before it started"));
    if (this.running < this.maxActive) {
      this.running++;
      return Promise.resolve(once);
    }
    if (this.waiting.length >= this.maxQueue) {
      return Promise.reject(
        new CapacityError(
          "server is at capacity: too many requests are active and queued; retry later",
          this.retryAfter(),
        ),
      );
    }
    return new Promise((resolve, reject) => {
      const grant = () => {
        this.running++;
        resolve(once);
      };
      waitInLine(this.waiting, { grant, reject }, reject, signal, "request was cancelled while queued");
    });
  }

  /** A rough wait: one second per full round of active streams ahead in the queue. */
  private retryAfter(): number {
    return Math.max(1, Math.ceil(this.waiting.length / Math.max(1, this.maxActive)));
  }
}
