import { fromWorkerError } from "../workers/worker_error.ts";
import { BadCheckpointError, InputError } from "../errors.ts";
import { type ChatMessage, readChatTemplate } from "../model/chat_template.ts";
import { newSpecialMark, type SpecialMark } from "../model/special_text.ts";
import { detectToolFormat, type ToolCallFormat, type ToolFunction } from "../model/tool_calls.ts";
import { DEFAULT_TEMPLATE_LIMITS, type TemplateLimits, TemplateSandbox } from "./template_sandbox.ts";
import type { TokenizerReply, TokenizerRequest } from "./tokenizer_protocol.ts";

/** How the served model ends a chat turn: a token when the marker is one, else a stop string. */
export interface ChatInfo {
  /** Where the template came from (`--chat-template` or the checkpoint's tokenizer_config.json). */
  origin: string;
  endOfTurnIds: number[];
  endOfTurnStop: string | null;
  /** How the template has its model write tool calls (Hermes where it knows no tools). */
  toolFormat: ToolCallFormat;
}

export interface TokenizerOptions {
  /** The text of `--chat-template FILE`, which replaces the checkpoint's. */
  chatTemplate?: string;
  /** What one render of the chat template may take. */
  templateLimits?: TemplateLimits;
  /**
   * Special-token text inside messages is tokenized as special tokens, as the template's own are
   * (`--special-tokens-in-content`); by default it is plain text, so a message cannot end its turn.
   */
  specialTokensInContent?: boolean;
}

/**
 * The serving thread's tokenizer: encoding happens in a worker, one prompt at a time, in order;
 * chat templates render in their sandbox first.
 */
export class RemoteTokenizer {
  private nextId = 1;
  private readonly waiting = new Map<
    number,
    { resolve: (result: number[] | string) => void; reject: (e: Error) => void }
  >();
  private template: TemplateSandbox | null = null;
  private mark: SpecialMark | null = null;
  /** The chat template's origin and end-of-turn marker; null when the model has no template. */
  chat: ChatInfo | null = null;

  private constructor(
    private readonly worker: Worker,
    /** The longest text one token stands for: a prompt longer than context x this cannot fit. */
    readonly maxTokenChars: number,
    readonly vocabSize: number,
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

  static async load(dir: string, opts: TokenizerOptions = {}): Promise<RemoteTokenizer> {
    const worker = new Worker(new URL("../workers/tokenizer_worker.ts", import.meta.url).href, {
      type: "module",
    });
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
      worker.postMessage({ type: "load", dir } satisfies TokenizerRequest);
    }).catch((e) => {
      worker.terminate();
      throw e;
    });
    const tokenizer = new RemoteTokenizer(worker, loaded.maxTokenChars, loaded.vocabSize);
    try {
      await tokenizer.openTemplate(dir, opts, loaded.specials, new Set(loaded.specialIds));
    } catch (e) {
      tokenizer.close();
      throw e;
    }
    return tokenizer;
  }

  /**
   * Starts the template's sandbox and renders its probe (what follows an answer): a template that
   * cannot finish that within the limits would fail every chat, so the model does not load.
   */
  private async openTemplate(
    dir: string,
    opts: TokenizerOptions,
    specials: string[],
    specialIds: Set<number>,
  ): Promise<void> {
    const src = await readChatTemplate(dir, opts.chatTemplate);
    if (!src) return;
    this.mark = opts.specialTokensInContent ? null : newSpecialMark();
    this.template = await TemplateSandbox.open(
      src,
      opts.templateLimits ?? DEFAULT_TEMPLATE_LIMITS,
      this.mark && { specials, mark: this.mark },
    );
    let marker: string | null;
    try {
      marker = await this.template.endOfTurn();
    } catch (e) {
      const message = `${(e as Error).message}, rendering a one-message probe at startup`;
      throw src.origin === "--chat-template"
        ? new InputError(message, "chat_template")
        : new BadCheckpointError(`${message} (give one with --chat-template FILE)`);
    }
    const ids = marker ? await this.encode(marker) : [];
    const single = ids.length === 1 && specialIds.has(ids[0]);
    this.chat = {
      origin: src.origin,
      endOfTurnIds: single ? ids : [],
      endOfTurnStop: marker && !single ? marker : null,
      toolFormat: detectToolFormat(src.source),
    };
  }

  encode(text: string): Promise<number[]> {
    return this.ask((id) => ({ type: "encode", id, text })) as Promise<number[]>;
  }

  /** The conversation (and the functions it offers) rendered with the chat template, encoded. */
  async encodeChat(
    messages: ChatMessage[],
    tools?: ToolFunction[],
    addGenerationPrompt = true,
  ): Promise<number[]> {
    const text = await this.template!.render(messages, addGenerationPrompt, tools);
    const mark = this.mark ?? undefined;
    return await this.ask((id) => ({ type: "encode", id, text, mark })) as number[];
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
    this.template?.close();
    for (const w of this.waiting.values()) w.reject(new Error("tokenizer closed"));
    this.waiting.clear();
  }
}
