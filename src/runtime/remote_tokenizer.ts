import { fromWorkerError } from "./worker_error.ts";
import type { ChatMessage } from "../model/chat_template.ts";
import type { ChatInfo, TokenizerReply, TokenizerRequest } from "./tokenizer_worker.ts";

/** The serving thread's tokenizer: encoding happens in a worker, one prompt at a time, in order. */
export class RemoteTokenizer {
  private nextId = 1;
  private readonly waiting = new Map<
    number,
    { resolve: (result: number[] | string) => void; reject: (e: Error) => void }
  >();

  private constructor(
    private readonly worker: Worker,
    /** The longest text one token stands for: a prompt longer than context x this cannot fit. */
    readonly maxTokenChars: number,
    readonly vocabSize: number,
    /** The chat template's origin and end-of-turn marker; null when the model has no template. */
    readonly chat: ChatInfo | null,
  ) {
    worker.onmessage = (e: MessageEvent<TokenizerReply>) => {
      const m = e.data;
      if (m.type === "loaded" || m.id === null) return;
      const w = this.waiting.get(m.id);
      this.waiting.delete(m.id);
      if (m.type === "encoded") w?.resolve(m.ids);
      else if (m.type === "decoded") w?.resolve(m.text);
      else w?.reject(fromWorkerError(m));
    };
  }

  /** `chatTemplate`: the text of `--chat-template FILE`, which replaces the checkpoint's. */
  static async load(dir: string, chatTemplate?: string): Promise<RemoteTokenizer> {
    const worker = new Worker(new URL("./tokenizer_worker.ts", import.meta.url).href, { type: "module" });
    const loaded = await new Promise<Extract<TokenizerReply, { type: "loaded" }>>((resolve, reject) => {
      worker.onmessage = (e: MessageEvent<TokenizerReply>) => {
        if (e.data.type === "loaded") resolve(e.data);
        else if (e.data.type === "failed") {
          reject(fromWorkerError(e.data));
        }
      };
      worker.onerror = (e) => {
        e.preventDefault();
        reject(new Error(`tokenizer worker failed: ${e.message}`));
      };
      worker.postMessage({ type: "load", dir, chatTemplate } satisfies TokenizerRequest);
    }).catch((e) => {
      worker.terminate();
      throw e;
    });
    return new RemoteTokenizer(worker, loaded.maxTokenChars, loaded.vocabSize, loaded.chat);
  }

  encode(text: string): Promise<number[]> {
    return this.ask((id) => ({ type: "encode", id, text })) as Promise<number[]>;
  }

  /** The conversation rendered with the chat template (a generation prompt added by default), encoded. */
  encodeChat(messages: ChatMessage[], addGenerationPrompt = true): Promise<number[]> {
    return this.ask((id) => ({ type: "chat", id, messages, addGenerationPrompt })) as Promise<number[]>;
  }

  decode(ids: number[]): Promise<string> {
    return this.ask((id) => ({ type: "decode", id, ids })) as Promise<string>;
  }

  private ask(request: (id: number) => TokenizerRequest): Promise<number[] | string> {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      this.worker.postMessage(request(id));
    });
  }

  close(): void {
    this.worker.terminate();
    for (const w of this.waiting.values()) w.reject(new Error("tokenizer closed"));
    this.waiting.clear();
  }
}
