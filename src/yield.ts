/** Longest stretch of back-to-back session runs before the event loop gets a turn. */
const MAX_BUSY_MS = 15;

/**
 * Longest the serving thread builds answers before other streams' events get a turn: every token of
 * every stream passes through that thread, so a slice of it is a gap in all of them.
 */
export const ANSWER_SLICE_MS = 5;

let lastYield = performance.now();
let yielded = 0;

/** Milliseconds this thread has spent waiting in yieldIfBusy so far (profiles leave it out of host time). */
export const yieldedMs = () => yielded;

/**
 * A WASM session run resolves through microtasks alone, so a busy decode loop would starve the
 * event loop (new requests, /fuse, client disconnects) until it ends. Only a timer turn lets Deno
 * poll sockets (a MessageChannel round trip does not), and `setTimeout(0)` costs milliseconds under
 * Deno, so the turn is taken once per MAX_BUSY_MS of work rather than once per step.
 */
export async function yieldIfBusy(maxMs = MAX_BUSY_MS): Promise<void> {
  const t0 = performance.now();
  if (t0 - lastYield < maxMs) return;
  await new Promise((resolve) => setTimeout(resolve, 0));
  lastYield = performance.now();
  yielded += lastYield - t0;
}

/** Waits for `p`, but no longer than `ms`; the timer never outlives the wait. */
export async function waitAtMost(p: Promise<unknown>, ms: number): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  await Promise.race([p, new Promise((r) => (timer = setTimeout(r, ms)))]);
  clearTimeout(timer);
}

/**
 * `items.map(f)` that gives the event loop its turn as it goes (yieldIfBusy): building a large
 * answer (thousands of logprob positions) must not pause other requests' streams.
 */
export async function mapSliced<T, R>(items: readonly T[], f: (item: T, index: number) => R): Promise<R[]> {
  const out = new Array<R>(items.length);
  for (let i = 0; i < items.length; i++) {
    if (i % 64 === 63) await yieldIfBusy(ANSWER_SLICE_MS);
    out[i] = f(items[i], i);
  }
  return out;
}
