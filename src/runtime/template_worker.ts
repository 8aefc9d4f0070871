/**
 * A chat template's renders, where the sandbox (template_sandbox.ts) can bound and kill them:
 * templates come inside the checkpoints people download, Jinja has loops, and one render may never
 * end or may fill memory. This runs under node:worker_threads because its workers take a heap limit
 * and Deno's own do not: a Deno worker that exhausts the heap aborts the whole process.
 */
import { parentPort, workerData } from "node:worker_threads";
import { type ChatMessage, ChatTemplate, type ChatTemplateSource } from "../model/chat_template.ts";
import { markSpecialText, type SpecialMark } from "../model/special_text.ts";
import { toWorkerError, type WorkerError } from "./worker_error.ts";

export interface TemplateWorkerData {
  src: ChatTemplateSource;
  /** Special-token texts to mark inside messages, and the mark; null leaves messages as they are. */
  protect: { specials: string[]; mark: SpecialMark } | null;
}

export type TemplateRequest =
  | { type: "render"; id: number; messages: ChatMessage[]; addGenerationPrompt: boolean }
  | { type: "endOfTurn"; id: number };

export type TemplateReply =
  | { type: "ready" }
  | { type: "rendered"; id: number; text: string | null }
  | { type: "failed"; id: number | null } & WorkerError;

const port = parentPort!;
const { src, protect } = workerData as TemplateWorkerData;
const post = (m: TemplateReply) => port.postMessage(m);

function marked(messages: ChatMessage[]): ChatMessage[] {
  if (!protect) return messages;
  const mark = (text: string) => markSpecialText(text, protect.specials, protect.mark);
  return messages.map((m) => ({ ...m, content: mark(m.content), ...(m.name ? { name: mark(m.name) } : {}) }));
}

try {
  const template = ChatTemplate.compile(src);
  port.on("message", (m: TemplateRequest) => {
    try {
      const text = m.type === "endOfTurn"
        ? template.endOfTurn()
        : template.render(marked(m.messages), m.addGenerationPrompt);
      post({ type: "rendered", id: m.id, text });
    } catch (e) {
      post({ type: "failed", id: m.id, ...toWorkerError(e) });
    }
  });
  post({ type: "ready" });
} catch (e) {
  post({ type: "failed", id: null, ...toWorkerError(e) });
}
