/// <reference lib="deno.worker" />
/**
 * Prompt tokenisation off the serving thread: a long prompt costs ~5 us a character, so a prompt
 * of a few hundred kilobytes would otherwise hold the event loop for seconds. Chat templates render
 * here too, for the same reason (a long conversation is a long prompt).
 */
import { toWorkerError, type WorkerError } from "./worker_error.ts";
import { TextTokenizer } from "../model/tokenizer.ts";
import { type ChatMessage, ChatTemplate, readChatTemplate } from "../model/chat_template.ts";

/** How the served model ends a chat turn: a token when the marker is one, else a stop string. */
export interface ChatInfo {
  /** Where the template came from (`--chat-template` or the checkpoint's tokenizer_config.json). */
  origin: string;
  endOfTurnIds: number[];
  endOfTurnStop: string | null;
}

export type TokenizerRequest =
  | { type: "load"; dir: string; chatTemplate?: string }
  | { type: "encode"; id: number; text: string }
  | { type: "chat"; id: number; messages: ChatMessage[]; addGenerationPrompt: boolean }
  | { type: "decode"; id: number; ids: number[] };

export type TokenizerReply =
  | { type: "loaded"; maxTokenChars: number; vocabSize: number; chat: ChatInfo | null }
  | { type: "encoded"; id: number; ids: number[] }
  | { type: "decoded"; id: number; text: string }
  | { type: "failed"; id: number | null } & WorkerError;

let tokenizer: TextTokenizer | null = null;
let template: ChatTemplate | null = null;
const post = (m: TokenizerReply) => self.postMessage(m);

function chatInfo(t: ChatTemplate, tok: TextTokenizer): ChatInfo {
  const marker = t.endOfTurn();
  const ids = marker ? tok.encode(marker) : [];
  const single = ids.length === 1 && tok.isSpecial(ids[0]);
  return {
    origin: t.src.origin,
    endOfTurnIds: single ? ids : [],
    endOfTurnStop: marker && !single ? marker : null,
  };
}

self.onmessage = async (e: MessageEvent<TokenizerRequest>) => {
  const m = e.data;
  const id = m.type === "load" ? null : m.id;
  try {
    if (m.type === "load") {
      tokenizer = await TextTokenizer.load(m.dir);
      const src = await readChatTemplate(m.dir, m.chatTemplate);
      template = src ? ChatTemplate.compile(src) : null;
      post({
        type: "loaded",
        maxTokenChars: tokenizer.maxTokenChars(),
        vocabSize: tokenizer.vocabSize,
        chat: template ? chatInfo(template, tokenizer) : null,
      });
    } else if (m.type === "encode") post({ type: "encoded", id: m.id, ids: tokenizer!.encode(m.text) });
    else if (m.type === "chat") {
      post({
        type: "encoded",
        id: m.id,
        ids: tokenizer!.encode(template!.render(m.messages, m.addGenerationPrompt)),
      });
    } else post({ type: "decoded", id: m.id, text: tokenizer!.decode(m.ids) });
  } catch (err) {
    post({ type: "failed", id, ...toWorkerError(err) });
  }
};
