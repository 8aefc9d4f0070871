/// <reference lib="deno.worker" />
/**
 * Prompt tokenisation off the serving thread: a long prompt costs ~5 us a character, so a prompt
 * of a few hundred kilobytes would otherwise hold the event loop for seconds.
 */
import { toWorkerError, type WorkerError } from "./worker_error.ts";
import { TextTokenizer } from "../model/tokenizer.ts";

export type TokenizerRequest =
  | { type: "load"; dir: string }
  | { type: "encode"; id: number; text: string }
  | { type: "decode"; id: number; ids: number[] };

export type TokenizerReply =
  | { type: "loaded"; maxTokenChars: number; vocabSize: number }
  | { type: "encoded"; id: number; ids: number[] }
  | { type: "decoded"; id: number; text: string }
  | { type: "failed"; id: number | null } & WorkerError;

let tokenizer: TextTokenizer | null = null;
const post = (m: TokenizerReply) => self.postMessage(m);

self.onmessage = async (e: MessageEvent<TokenizerRequest>) => {
  const m = e.data;
  const id = m.type === "load" ? null : m.id;
  try {
    if (m.type === "load") {
      tokenizer = await TextTokenizer.load(m.dir);
      post({ type: "loaded", maxTokenChars: tokenizer.maxTokenChars(), vocabSize: tokenizer.vocabSize });
    } else if (m.type === "encode") post({ type: "encoded", id: m.id, ids: tokenizer!.encode(m.text) });
    else post({ type: "decoded", id: m.id, text: tokenizer!.decode(m.ids) });
  } catch (err) {
    post({ type: "failed", id, ...toWorkerError(err) });
  }
};
