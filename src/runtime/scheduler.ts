import { InputError } from "../errors.ts";

/** Refused admission: the server is at capacity; Retry-After tells the client when to come back. */
export class QueueFullError extends InputError {
  constructor(readonly retryAfterSeconds: number) {
    super("server is at capacity: too many requests are active and queued; retry later", 429);
  }
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

  constructor(readonly maxActive: number, readonly maxQueue: number) {}

  get active(): number {
    return this.running;
  }

  get queued(): number {
    return this.waiting.length;
  }

  /** Resolves with a release function once a slot is free; rejects at once when the queue is full. */
  acquire(signal?: AbortSignal): Promise<() => void> {
    const release = () => {
      this.running--;
      const next = this.waiting.shift();
      if (next) next.grant();
    };
    let released = false;
    const once = () => {
      if (!released) {
        released = true;
        release();
      }
    };
    if (this.running < this.maxActive) {
      this.running++;
      return Promise.resolve(once);
    }
    if (this.waiting.length >= this.maxQueue) return Promise.reject(new QueueFullError(this.retryAfter()));
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
          reject(new InputError("request was cancelled while queued", 409));
        }
      }, { once: true });
    });
  }

  /** A rough wait: one second per full round of active streams ahead in the queue. */
  private retryAfter(): number {
    return Math.max(1, Math.ceil(this.waiting.length / Math.max(1, this.maxActive)));
  }
}
