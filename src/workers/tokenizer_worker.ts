/// <reference lib="deno.worker" />
/**
 * Prompt tokenisation off the serving thread: its cost grows with the prompt's characters, so a
 * prompt of a few hundred kilobytes would otherwise hold the event loop for seconds. (Chat templates render
 * in their own sandbox, template_sandbox.ts, and their text is tokenized here.)
 */
import { toWorkerError } from "./worker_error.ts";
import { TextTokenizer } from "../model/tokenizer.ts";
import type { TokenizerReply, TokenizerRequest } from "../serving/tokenizer_protocol.ts";

let tokenizer: TextTokenizer | null = null;
const post = (m: TokenizerReply) => self.postMessage(m);

self.onmessage = async (e: MessageEvent<TokenizerRequest>) => {
  const m = e.data;
  const id = m.type === "load" ? null : m.id;
  try {
    if (m.type === "load") {
      tokenizer = await TextTokenizer.load(m.dir);
      post({
        type: "loaded",
        maxTokenChars: tokenizer.maxTokenChars(),
        vocabSize: tokenizer.vocabSize,
        specials: tokenizer.specialTexts(),
        specialIds: tokenizer.specialIds(),
      });
    } else if (m.type === "encode") {
      const ids = m.mark ? tokenizer!.encodeMarked(m.text, m.mark) : tokenizer!.encode(m.text);
      post({ type: "encoded", id: m.id, ids });
    } else post({ type: "decoded", id: m.id, text: tokenizer!.decode(m.ids) });
  } catch (err) {
    post({ type: "failed", id, ...toWorkerError(err) });
  }
};
