import { Template } from "@huggingface/jinja";
import { join } from "node:path";
import { BadCheckpointError, InputError } from "../errors.ts";

/** A call as a template reads it back: arguments as an object, as transformers passes them. */
export interface TemplateToolCall {
  id?: string;
  type: "function";
  function: { name: string; arguments: unknown };
}

/** One message of a conversation as the template sees it (OpenAI's roles; text content only). */
export interface ChatMessage {
  role: string;
  content: string;
  name?: string;
  /** An assistant's earlier calls, arguments as objects (the key is absent when there are none). */
  tool_calls?: TemplateToolCall[];
  /** A tool result's call. */
  tool_call_id?: string;
}

/** A template's text, where it came from, and the special tokens it may refer to by name. */
export interface ChatTemplateSource {
  source: string;
  /** Named in errors: `--chat-template` or the checkpoint's tokenizer_config.json. */
  origin: string;
  /** bos_token, eos_token, ...: what the Hugging Face tokenizer passes to its template. */
  specialTokens: Record<string, string>;
}

/** tokenizer_config.json writes a special token as its text or as an AddedToken object. */
function tokenText(v: unknown): string | null {
  if (typeof v === "string") return v;
  if (v && typeof v === "object" && typeof (v as { content?: unknown }).content === "string") {
    return (v as { content: string }).content;
  }
  return null;
}

/**
 * The checkpoint's chat template: `override` (the text of `--chat-template FILE`) when given, else
 * tokenizer_config.json's `chat_template` (a string, or a list of named templates of which "default"
 * is the chat one). Null when there is none.
 */
export async function readChatTemplate(dir: string, override?: string): Promise<ChatTemplateSource | null> {
  const path = join(dir, "tokenizer_config.json");
  let config: Record<string, unknown> = {};
  try {
    config = JSON.parse(await Deno.readTextFile(path));
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) {
      throw new BadCheckpointError(`cannot read ${path}: ${(e as Error).message}`);
    }
  }
  const specialTokens: Record<string, string> = {};
  for (const name of ["bos_token", "eos_token", "unk_token", "pad_token"]) {
    const text = tokenText(config[name]);
    if (text !== null) specialTokens[name] = text;
  }
  if (override !== undefined) return { source: override, origin: "--chat-template", specialTokens };
  const t = config.chat_template;
  const source = typeof t === "string"
    ? t
    : Array.isArray(t)
    ? (t.find((x) => x?.name === "default")?.template as string | undefined)
    : undefined;
  return source === undefined ? null : { source, origin: path, specialTokens };
}

/** A probe no real conversation contains, to find what the template writes after an answer. */
const ANSWER_PROBE = "\u2063fusedge-answer\u2063";

/**
 * A Hugging Face chat template, rendered the way transformers renders it (@huggingface/jinja is the
 * renderer transformers.js uses: trim_blocks, lstrip_blocks, raise_exception, strftime_now).
 */
export class ChatTemplate {
  private constructor(private readonly template: Template, readonly src: ChatTemplateSource) {}

  /** Parses the template; a template that does not parse is the origin's fault, named as such. */
  static compile(src: ChatTemplateSource): ChatTemplate {
    try {
      return new ChatTemplate(new Template(src.source), src);
    } catch (e) {
      const message = `the chat template from ${src.origin} does not parse: ${(e as Error).message}`;
      throw src.origin === "--chat-template"
        ? new InputError(message, "chat_template")
        : new BadCheckpointError(`${message} (give one with --chat-template FILE)`);
    }
  }

  /** The prompt text for `messages`; a template that refuses them (raise_exception) is a 400. */
  render(messages: ChatMessage[], addGenerationPrompt = true, extra: Record<string, unknown> = {}): string {
    try {
      return this.template.render({
        ...this.src.specialTokens,
        ...extra,
        messages,
        add_generation_prompt: addGenerationPrompt,
      });
    } catch (e) {
      throw new InputError(`the chat template refused the messages: ${(e as Error).message}`, "messages");
    }
  }

  /**
   * What the template writes right after an assistant's answer, up to the first whitespace: the
   * end-of-turn marker (`<|eot_id|>`, `<|im_end|>`, `</s>`) the model emits when it is done. Null
   * when the template renders nothing there, or cannot render a plain exchange.
   */
  endOfTurn(): string | null {
    let text: string;
    try {
      text = this.render(
        [{ role: "user", content: "hi" }, { role: "assistant", content: ANSWER_PROBE }],
        false,
      );
    } catch {
      return null;
    }
    const at = text.lastIndexOf(ANSWER_PROBE);
    if (at < 0) return null;
    const marker = text.slice(at + ANSWER_PROBE.length).trimStart().split(/\s/)[0];
    return marker || null;
  }
}
