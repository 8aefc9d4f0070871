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
  const text = events.map((e) => (e.choices as { text: string }[])[0].text).join("");
  return { events, done, text, arrivals };
}

export function post(base: string, path: string, body: unknown, raw = false): Promise<Response> {
  return fetch(`${base}${path}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: raw ? (body as string) : JSON.stringify(body),
  });
}
