import { Worker } from "node:worker_threads";
import { InputError } from "../errors.ts";
import type { ChatMessage, ChatTemplateSource } from "../model/chat_template.ts";
import { fromWorkerError } from "./worker_error.ts";
import type { TemplateReply, TemplateRequest, TemplateWorkerData } from "./template_worker.ts";

/** What one render may take: wall time, and the heap of the worker that renders it. */
export interface TemplateLimits {
  timeMs: number;
  heapMb: number;
}

export const DEFAULT_TEMPLATE_LIMITS: TemplateLimits = { timeMs: 2000, heapMb: 128 };

/** A render that ran past its limits: the template's loops or memory, not the caller's input. */
export class TemplateOverrunError extends InputError {}

interface Spawned {
  worker: Worker;
  ready: Promise<void>;
  /** Settles when the worker replies, fails or exits (the current render's outcome). */
  replies: Map<number, (reply: TemplateReply | Error) => void>;
  exited: boolean;
}

/**
 * Renders a chat template in a worker with a capped heap, one render at a time, each under a time
 * limit. A render that overruns (a loop, or a heap at its cap, where V8 stalls collecting) kills the
 * worker and fails that request alone; the next render gets a fresh worker, so memory returns to
 * where it was. Renders queue behind each other: a template that is slow for one conversation costs
 * the others at most the time limit each, and never the serving thread or the streams.
 */
export class TemplateSandbox {
  private current: Spawned;
  private queue: Promise<unknown> = Promise.resolve();
  private nextId = 1;
  private closed = false;

  private constructor(
    private readonly data: TemplateWorkerData,
    readonly limits: TemplateLimits,
  ) {
    this.current = this.spawn();
  }

  /** Starts the worker and waits for the template to parse (a parse error rejects, as compile does). */
  static async open(
    src: ChatTemplateSource,
    limits: TemplateLimits,
    protect: TemplateWorkerData["protect"],
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

  render(messages: ChatMessage[], addGenerationPrompt: boolean): Promise<string> {
    return this.run((id) => ({ type: "render", id, messages, addGenerationPrompt })) as Promise<string>;
  }

  /** What the template writes after an answer (ChatTemplate.endOfTurn), under the same limits. */
  endOfTurn(): Promise<string | null> {
    return this.run((id) => ({ type: "endOfTurn", id }));
  }

  close(): void {
    this.closed = true;
    this.kill(new Error("the chat template's renderer is closed"));
  }

  private run(request: (id: number) => TemplateRequest): Promise<string | null> {
    const result = this.queue.then(() => this.once(request(this.nextId++)));
    this.queue = result.catch(() => {});
    return result;
  }

  private async once(request: TemplateRequest): Promise<string | null> {
    if (this.closed) throw new Error("the chat template's renderer is closed");
    if (this.current.exited) this.current = this.spawn();
    const spawned = this.current;
    await spawned.ready;
    const reply = await new Promise<TemplateReply | Error>((resolve) => {
      const timer = setTimeout(() => {
        resolve(this.overrun(`did not finish within ${this.limits.timeMs} ms`));
        this.restart(spawned);
      }, this.limits.timeMs);
      spawned.replies.set(request.id, (r) => {
        clearTimeout(timer);
        resolve(r);
      });
      spawned.worker.postMessage(request);
    });
    spawned.replies.delete(request.id);
    if (reply instanceof Error) throw reply;
    if (reply.type === "failed") throw fromWorkerError(reply);
    if (reply.type !== "rendered") {
      throw new Error(`unexpected reply from the template worker: ${reply.type}`);
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

  private spawn(): Spawned {
    const worker = new Worker(new URL("./template_worker.ts", import.meta.url), {
      workerData: this.data,
      resourceLimits: { maxOldGenerationSizeMb: this.limits.heapMb },
    });
    const replies = new Map<number, (reply: TemplateReply | Error) => void>();
    const spawned: Spawned = { worker, replies, ready: Promise.resolve(), exited: false };
    spawned.ready = new Promise<void>((resolve, reject) => {
      const fail = (e: Error) => {
        reject(e);
        for (const settle of replies.values()) settle(e);
        replies.clear();
      };
      worker.on("message", (m: TemplateReply) => {
        if (m.type === "ready") resolve();
        else if (m.type === "failed" && m.id === null) fail(fromWorkerError(m));
        else if (m.id !== null) replies.get(m.id)?.(m);
      });
      worker.on("error", (e: Error) => fail(this.overrun(`stopped its renderer: ${e.message}`)));
      worker.on("exit", () => {
        spawned.exited = true;
        fail(this.overrun("stopped its renderer"));
      });
    });
    // A worker that dies between renders fails no one; the next render starts another.
    spawned.ready.catch(() => {});
    return spawned;
  }

  /** Replaces a worker that overran (its heap is freed with it). */
  private restart(spawned: Spawned): void {
    if (this.current !== spawned) return;
    void spawned.worker.terminate();
    if (!this.closed) this.current = this.spawn();
  }

  private kill(e: Error): void {
    for (const settle of this.current.replies.values()) settle(e);
    this.current.replies.clear();
    void this.current.worker.terminate();
  }
}
