import { fileURLToPath } from "node:url";
import { InputError } from "../errors.ts";
import type { ChatMessage, ChatTemplateSource } from "../model/chat_template.ts";
import type { ToolFunction } from "../model/tool_calls.ts";
import { fromWorkerError } from "../workers/worker_error.ts";
import {
  lines,
  TEMPLATE_RENDERER_ARG,
  type TemplateProcessData,
  type TemplateReply,
  type TemplateRequest,
} from "./template_protocol.ts";

/** What one render may take: wall time, and the heap of the process that renders it. */
export interface TemplateLimits {
  timeMs: number;
  heapMb: number;
}

export const DEFAULT_TEMPLATE_LIMITS: TemplateLimits = { timeMs: 2000, heapMb: 128 };

/** A render that ran past its limits: the template's loops or memory, not the caller's input. */
export class TemplateOverrunError extends InputError {}

/**
 * How to start the renderer: this Deno running template_process.ts with no permissions at all, or
 * a compiled fusedge binary (`deno compile` embeds no second entry point) told to be the renderer.
 * The heap cap is V8's; a compiled binary takes V8 flags from DENO_V8_FLAGS only.
 */
function rendererCommand(heapMb: number): Deno.Command {
  const heap = `--max-old-space-size=${heapMb}`;
  const io = { stdin: "piped", stdout: "piped", stderr: "piped" } as const;
  if (Deno.build.standalone) {
    return new Deno.Command(Deno.execPath(), {
      args: [TEMPLATE_RENDERER_ARG],
      env: { DENO_V8_FLAGS: heap },
      ...io,
    });
  }
  return new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--quiet",
      "--no-prompt",
      `--v8-flags=${heap}`,
      `--config=${fileURLToPath(new URL("../../deno.json", import.meta.url))}`,
      new URL("../workers/template_process.ts", import.meta.url).href,
    ],
    ...io,
  });
}

interface Renderer {
  process: Deno.ChildProcess;
  /** One line to the renderer: its data first, then requests. */
  send: (m: TemplateProcessData | TemplateRequest) => void;
  ready: Promise<void>;
  /** The reply awaited now: renders go one at a time. */
  waiting: ((reply: TemplateReply | Error) => void) | null;
  exited: boolean;
}

/**
 * Renders a chat template in a process of its own, one render at a time, each under a time limit,
 * with a capped heap. A render that overruns (a loop; a heap at its cap, where V8 stalls collecting
 * or aborts) ends the process and fails that request alone; the next render gets a fresh process,
 * so memory returns to where it was. Renders queue behind each other: a template that is slow for
 * one conversation costs the others at most the time limit each, and never the serving thread or
 * the streams.
 */
export class TemplateSandbox {
  private current: Renderer;
  private queue: Promise<unknown> = Promise.resolve();
  private nextId = 1;
  private closed = false;

  private constructor(
    private readonly data: TemplateProcessData,
    readonly limits: TemplateLimits,
  ) {
    this.current = this.spawn();
  }

  /** Starts the renderer and waits for the template to parse (a parse error rejects, as compile does). */
  static async open(
    src: ChatTemplateSource,
    limits: TemplateLimits,
    protect: TemplateProcessData["protect"],
  ): Promise<TemplateSandbox> {
    const sandbox = new TemplateSandbox({ src, protect }, limits);
    try {
      await sandbox.current.ready;
    } catch (e) {
      sandbox.close();
      throw e;
    }
    return sandbox;
  }

  get origin(): string {
    return this.data.src.origin;
  }

  render(messages: ChatMessage[], addGenerationPrompt: boolean, tools?: ToolFunction[]): Promise<string> {
    return this.run((id) => ({ type: "render", id, messages, addGenerationPrompt, tools })) as Promise<
      string
    >;
  }

  /** What the template writes after an answer (ChatTemplate.endOfTurn), under the same limits. */
  endOfTurn(): Promise<string | null> {
    return this.run((id) => ({ type: "endOfTurn", id }));
  }

  close(): void {
    this.closed = true;
    this.end(this.current, new Error("the chat template's renderer is closed"));
  }

  private run(request: (id: number) => TemplateRequest): Promise<string | null> {
    const result = this.queue.then(() => this.once(request(this.nextId++)));
    this.queue = result.catch(() => {});
    return result;
  }

  private async once(request: TemplateRequest): Promise<string | null> {
    if (this.closed) throw new Error("the chat template's renderer is closed");
    if (this.current.exited) this.current = this.spawn();
    const renderer = this.current;
    await renderer.ready;
    const reply = await new Promise<TemplateReply | Error>((resolve) => {
      const timer = setTimeout(() => {
        this.end(renderer, this.overrun(`did not finish within ${this.limits.timeMs} ms`));
      }, this.limits.timeMs);
      renderer.waiting = (r) => {
        clearTimeout(timer);
        renderer.waiting = null;
        resolve(r);
      };
      renderer.send(request);
    });
    if (reply instanceof Error) throw reply;
    if (reply.type === "failed") throw fromWorkerError(reply);
    if (reply.type !== "rendered") {
      throw new Error(`unexpected reply from the template renderer: ${reply.type}`);
    }
    return reply.text;
  }

  private overrun(what: string): TemplateOverrunError {
    return new TemplateOverrunError(
      `the chat template from ${this.origin} ${what} (at most ${this.limits.timeMs} ms and a ` +
        `${this.limits.heapMb} MB heap a render: --template-time-ms, --template-heap-mb)`,
      "messages",
    );
  }

  private spawn(): Renderer {
    const process = rendererCommand(this.limits.heapMb).spawn();
    const writer = process.stdin.getWriter();
    const encoder = new TextEncoder();
    const renderer: Renderer = {
      process,
      send: (m) => void writer.write(encoder.encode(JSON.stringify(m) + "\n")).catch(() => {}),
      ready: Promise.resolve(),
      waiting: null,
      exited: false,
    };
    renderer.ready = new Promise<void>((resolve, reject) => {
      (async () => {
        for await (const line of lines(process.stdout)) {
          const m = JSON.parse(line) as TemplateReply;
          if (m.type === "ready") resolve();
          else if (m.type === "failed" && m.id === null) reject(fromWorkerError(m));
          else renderer.waiting?.(m);
        }
      })().catch(() => {}).finally(async () => {
        renderer.exited = true;
        const status = await process.status;
        const why = status.signal ? `by ${status.signal}` : `with exit code ${status.code}`;
        const e = this.overrun(`ran out of its heap or ended its renderer (${why})`);
        reject(e);
        renderer.waiting?.(e);
      });
    });
    // Its diagnostics (V8's out-of-memory report) are not the operator's to read.
    process.stderr.cancel().catch(() => {});
    renderer.send(this.data);
    // A renderer that dies between renders fails no one; the next render starts another.
    renderer.ready.catch(() => {});
    return renderer;
  }

  /** Kills a renderer (its memory goes with it), failing what it was rendering with `e`. */
  private end(renderer: Renderer, e: Error): void {
    renderer.exited = true;
    renderer.waiting?.(e);
    try {
      renderer.process.kill("SIGKILL");
    } catch { /* already gone */ }
  }
}
