import { join } from "node:path";
import { sseData } from "../src/client/sse.ts";
import { ROOT } from "./helpers.ts";

export interface RunningServer {
  base: string;
  port: number;
  process: Deno.ChildProcess;
  /** Resolves once the model is loaded ("ready" on stdout). */
  ready: Promise<void>;
  /** The JSON lines the server printed after `listening`, as they arrive. */
  events: Record<string, unknown>[];
  readonly exited: boolean;
  stop(): Promise<void>;
}

/** Starts `main.ts serve` (or the compiled binary) on a free port and reads its address from stdout. */
export async function startServer(args: string[], binary?: string): Promise<RunningServer> {
  const cmd = binary
    ? new Deno.Command(binary, {
      args: ["serve", "--port", "0", ...args],
      stdout: "piped",
      stderr: "inherit",
      cwd: "/",
    })
    : new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", join(ROOT, "main.ts"), "serve", "--port", "0", ...args],
      stdout: "piped",
      stderr: "inherit",
    });
  const process = cmd.spawn();
  const lines = process.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  const nextEvent = async (): Promise<Record<string, unknown>> => {
    while (!buffered.includes("\n")) {
      const { value, done } = await lines.read();
      if (done) throw new Error("server exited before printing its address");
      buffered += value;
    }
    const at = buffered.indexOf("\n");
    const line = buffered.slice(0, at);
    buffered = buffered.slice(at + 1);
    return JSON.parse(line);
  };
  const listening = await nextEvent();
  const port = listening.port as number;
  const events: Record<string, unknown>[] = [];
  let exited = false;
  // Every later stdout line is kept: request logs, ready, draining, stopped.
  const ready = (async () => {
    for (;;) {
      const e = await nextEvent();
      events.push(e);
      if (e.event === "ready") break;
      if (e.event === "stopped") throw new Error("server stopped before it was ready");
    }
    (async () => {
      try {
        for (;;) events.push(await nextEvent());
      } catch {
        exited = true;
      }
    })();
  })();
  return {
    base: `http://127.0.0.1:${port}`,
    port,
    process,
    ready,
    events,
    get exited() {
      return exited;
    },
    stop: async () => {
      try {
        process.kill("SIGTERM");
      } catch { /* already gone */ }
      await process.status;
    },
  };
}

export interface SseResult {
  events: Record<string, unknown>[];
  done: boolean;
  text: string;
  /** Milliseconds from the request to each event. */
  arrivals: number[];
}

/** Reads an SSE completion stream event by event as it arrives on the socket. */
export async function readSse(res: Response): Promise<SseResult> {
  const t0 = performance.now();
  const events: Record<string, unknown>[] = [];
  const arrivals: number[] = [];
  let done = false;
  for await (const data of sseData(res.body!)) {
    arrivals.push(performance.now() - t0);
    if (data === "[DONE]") done = true;
    else events.push(JSON.parse(data));
  }
  const text = events.map((e) => (e.choices as { text: string }[])[0]?.text ?? "").join("");
  return { events, done, text, arrivals };
}

export function post(base: string, path: string, body: unknown, raw = false): Promise<Response> {
  return fetch(`${base}${path}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: raw ? (body as string) : JSON.stringify(body),
  });
}

/**
 * POSTs `body` (JSON text) to `path` `count` times at once from a worker thread, so that building and
 * sending megabytes of requests does not hold up the thread that measures the server's streams and
 * /health beside them (on 2 cores the test's own sending stalled its /health probe for 270-740 ms,
 * where a probe from another process saw the server answer within 63 ms). Resolves with each answer.
 */
export function postFromWorker(
  base: string,
  path: string,
  body: string,
  count: number,
): Promise<{ status: number; body: { error: { message: string } } }[]> {
  const code = `self.onmessage = async ({ data }) => {
    const answers = await Promise.all(Array.from({ length: data.count }, async () => {
      const res = await fetch(data.url, { method: "POST", headers: { "content-type": "application/json" }, body: data.body });
      return { status: res.status, body: await res.json() };
    }));
    self.postMessage(answers);
  };`;
  const url = URL.createObjectURL(new Blob([code], { type: "text/javascript" }));
  const worker = new Worker(url, { type: "module" });
  return new Promise((resolve, reject) => {
    worker.onmessage = (e) => resolve(e.data);
    worker.onerror = (e) => reject(new Error(e.message));
    worker.postMessage({ url: `${base}${path}`, body, count });
  }).finally(() => {
    worker.terminate();
    URL.revokeObjectURL(url);
  }) as Promise<{ status: number; body: { error: { message: string } } }[]>;
}

/** Sends one raw HTTP/1.1 request (for headers fetch will not send as given, such as Host). */
export async function rawRequest(
  port: number,
  head: string,
  body = "",
): Promise<{ status: number; text: string }> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    const bytes = new TextEncoder().encode(body);
    const extra = body ? `content-length: ${bytes.length}\r\n` : "";
    await conn.write(new TextEncoder().encode(`${head}\r\n${extra}connection: close\r\n\r\n`));
    if (body) await conn.write(bytes);
    const chunks: Uint8Array[] = [];
    const buf = new Uint8Array(65536);
    for (;;) {
      const n = await conn.read(buf);
      if (n === null) break;
      chunks.push(buf.slice(0, n));
    }
    const text = new TextDecoder().decode(new Uint8Array(chunks.flatMap((c) => [...c])));
    return { status: Number(text.split(" ")[1]), text };
  } finally {
    try {
      conn.close();
    } catch { /* closed by the server */ }
  }
}

/**
 * Keeps streaming completions, one after another, for as long as `during` runs, and reports the
 * largest gap between two consecutive tokens of a stream (after its first): the measure of "a stream
 * must never pause because of another request".
 */
export async function streamWhile(
  base: string,
  during: () => Promise<unknown>,
): Promise<{ maxGapMs: number; tokens: number; streams: number; allDone: boolean }> {
  let finished = false;
  const action = during().finally(() => (finished = true));
  let maxGapMs = 0;
  let tokens = 0;
  let streams = 0;
  let allDone = true;
  do {
    const res = await post(base, "/v1/completions", {
      prompt: "def main(",
      max_tokens: 200,
      temperature: 0,
      stream: true,
    });
    let last = 0;
    let n = 0;
    let done = false;
    for await (const data of sseData(res.body!)) {
      const now = performance.now();
      if (data === "[DONE]") done = true;
      else if (n++ > 0) maxGapMs = Math.max(maxGapMs, now - last);
      last = now;
    }
    tokens += n;
    streams++;
    allDone &&= done;
  } while (!finished);
  await action;
  return { maxGapMs, tokens, streams, allDone };
}

/** Polls /health every 50 ms until stopped; returns the slowest answer in ms. */
export function healthProbe(base: string): { stop(): Promise<number> } {
  let running = true;
  let worst = 0;
  const loop = (async () => {
    while (running) {
      const t0 = performance.now();
      const res = await fetch(`${base}/health`);
      await res.body?.cancel();
      worst = Math.max(worst, performance.now() - t0);
      await new Promise((r) => setTimeout(r, 50));
    }
  })();
  return {
    stop: async () => {
      running = false;
      await loop;
      return worst;
    },
  };
}

/** One sample of a Prometheus metric (the first series of that name), NaN when absent. */
export function metric(text: string, name: string): number {
  const line = text.split("\n").find((l) => l.startsWith(name + " ") || l.startsWith(name + "{"));
  return line ? Number(line.split(" ").at(-1)) : NaN;
}

/** Polls `check` every 20 ms until it holds or `ms` pass; whether it held. */
export async function waitFor(check: () => Promise<boolean>, ms = 5000): Promise<boolean> {
  const end = performance.now() + ms;
  while (performance.now() < end) {
    if (await check()) return true;
    await new Promise((r) => setTimeout(r, 20));
  }
  return false;
}

/** Polls a background job's route (/analysis, /bench) until it stops running; returns its last state. */
export async function waitForJob(base: string, path: string, timeoutMs = 120_000) {
  const end = performance.now() + timeoutMs;
  for (;;) {
    const body = await (await fetch(`${base}${path}`)).json();
    if (body.status !== "running" || performance.now() > end) return body;
    await new Promise((r) => setTimeout(r, 100));
  }
}
