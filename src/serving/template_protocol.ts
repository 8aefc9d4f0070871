/**
 * The chat-template renderer's protocol (template_sandbox.ts starts src/workers/template_process.ts):
 * JSON lines. The first line in is the TemplateProcessData; then requests, one a line, each answered
 * by one line out, in order.
 */
import type { ChatMessage, ChatTemplateSource } from "../model/chat_template.ts";
import type { SpecialMark } from "../model/special_text.ts";
import type { ToolFunction } from "../model/tool_calls.ts";
import type { WorkerError } from "../workers/worker_error.ts";

export interface TemplateProcessData {
  src: ChatTemplateSource;
  /** Special-token texts to mark inside messages, and the mark; null leaves messages as they are. */
  protect: { specials: string[]; mark: SpecialMark } | null;
}

export type TemplateRequest =
  | {
    type: "render";
    id: number;
    messages: ChatMessage[];
    addGenerationPrompt: boolean;
    /** Functions offered: the template's own `tools` when it renders them, else the default prompt. */
    tools?: ToolFunction[];
  }
  | { type: "endOfTurn"; id: number };

export type TemplateReply =
  | { type: "ready" }
  | { type: "rendered"; id: number; text: string | null }
  | { type: "failed"; id: number | null } & WorkerError;

/** The argument that makes a compiled fusedge binary this renderer (main.ts). */
export const TEMPLATE_RENDERER_ARG = "__render-chat-templates";

/** A byte stream's lines as they come: the protocol's reader on both ends. */
export async function* lines(stream: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  const decoder = new TextDecoder();
  let buffered = "";
  for await (const chunk of stream) {
    buffered += decoder.decode(chunk, { stream: true });
    let at: number;
    while ((at = buffered.indexOf("\n")) >= 0) {
      yield buffered.slice(0, at);
      buffered = buffered.slice(at + 1);
    }
  }
}
