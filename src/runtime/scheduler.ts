import { CancelledError, CapacityError } from "../errors.ts";

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

  constructor(readonly maxActive: number, readonly maxQueue: number) {}

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
      const entry = {
        grant: () => {
          this.running++;
          resolve(once);
        },
        reject,
      };
      this.waiting.push(entry);
      signal?.addEventListener("abort", () => {
        const at = this.waiting.indexOf(entry);
        if (at >= 0) {
          this.waiting.splice(at, 1);
          reject(new CancelledError("request was cancelled while queued"));
        }
      }, { once: true });
    });
  }

  /** A rough wait: one second per full round of active streams ahead in the queue. */
  private retryAfter(): number {
    return Math.max(1, Math.ceil(this.waiting.length / Math.max(1, this.maxActive)));
  }
}
