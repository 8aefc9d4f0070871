/**
 * Tool calls as a model writes them: how its chat template marks a call, the structural tag that
 * constrains a call to a listed function with valid arguments, and the parser that reads calls back
 * out of the generated text, piece by piece as they stream.
 */
import type { ChatMessage } from "./chat_template.ts";

/** A function a request offers the model; `parameters` is a JSON schema of an object. */
export interface ToolFunction {
  name: string;
  description?: string;
  parameters: Record<string, unknown>;
}

/** OpenAI's `tool_choice`: the model decides, never calls, must call, or must call this one. */
export type ToolChoice = "auto" | "none" | "required" | { name: string };

/** What a request asks of tools, validated. */
export interface ToolRequest {
  functions: ToolFunction[];
  choice: ToolChoice;
  /** More than one call in one answer (OpenAI's `parallel_tool_calls`, true by default). */
  parallel: boolean;
}

/**
 * How a model family writes its calls. A call is `{"name": "NAME", "<argsKey>": ARGUMENTS}` inside
 * a block that `open` starts and `close` ends; a block holds one call (then blocks follow one another,
 * `join` between them) or a list of them (`join` between calls).
 */
export interface ToolCallFormat {
  name: "hermes" | "llama3_json" | "nemotron";
  open: string;
  close: string;
  /** The text whose appearance starts a call: what tells a call from prose. */
  trigger: string;
  perBlock: "one" | "many";
  join: string;
  argsKey: "arguments" | "parameters";
  /** The family knows more than one call a turn. */
  parallel: boolean;
}

/** Qwen 2.5/3, Hermes and most ChatML models; also the default for templates that know no tools. */
export const HERMES: ToolCallFormat = {
  name: "hermes",
  open: "<tool_call>\n",
  close: "\n</tool_call>",
  trigger: "<tool_call>",
  perBlock: "one",
  join: "\n",
  argsKey: "arguments",
  parallel: true,
};

/** Llama 3.1-3.3's JSON calls: a bare object, one a turn. */
export const LLAMA3_JSON: ToolCallFormat = {
  name: "llama3_json",
  open: "",
  close: "",
  trigger: '{"name": "',
  perBlock: "one",
  join: "",
  argsKey: "parameters",
  parallel: false,
};

/** Llama-Nemotron (DeciLM) models: a list of calls in one `<TOOLCALL>` block. */
export const NEMOTRON: ToolCallFormat = {
  name: "nemotron",
  open: "<TOOLCALL>[",
  close: "]</TOOLCALL>",
  trigger: "<TOOLCALL>",
  perBlock: "many",
  join: ", ",
  argsKey: "arguments",
  parallel: true,
};

/** A template's code without its comments, which may mention anything. */
const code = (source: string) => source.replace(/\{#[\s\S]*?#\}/g, "");

/** The template renders `tools` itself; otherwise the default prompt (`inlineTools`) carries them. */
export const templateKnowsTools = (source: string): boolean => /\btools\b/.test(code(source));

/**
 * The format a template teaches its model, read from the markers it writes; Hermes where it writes
 * none it knows (and always for templates that know no tools: the default prompt teaches Hermes).
 */
export function detectToolFormat(template: string): ToolCallFormat {
  const source = code(template);
  if (!templateKnowsTools(source)) return HERMES;
  if (source.includes("<TOOLCALL>")) return NEMOTRON;
  if (source.includes("<tool_call>")) return HERMES;
  if (source.includes('"parameters": ') || source.includes("<|python_tag|>")) return LLAMA3_JSON;
  return HERMES;
}

/**
 * JSON as Python's json.dumps writes it (", " and ": "): what transformers' `tojson` gives templates
 * and what the call grammar makes a model write, so earlier calls read as the model writes them.
 */
export function pyJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(pyJson).join(", ")}]`;
  if (value && typeof value === "object") {
    return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${pyJson(v)}`).join(", ")}}`;
  }
  return JSON.stringify(value) ?? "null";
}

/** The fixed text that starts a call of `name`, up to its arguments. */
const callBegin = (f: ToolCallFormat, name: string) => `{"name": ${JSON.stringify(name)}, "${f.argsKey}": `;
const CALL_END = "}";

/** A structural tag format (xgrammar's JSON form): plain data, compiled where the model runs. */
export type TagFormat = Record<string, unknown>;

/**
 * The structural tag that lets the model write only valid calls: under `required` or a named
 * function, calls and nothing else; under `auto`, free text until the format's trigger and a valid
 * call after it, or, when the answer's text is itself constrained (`text`), either calls or that.
 * Null under `none`.
 */
export function toolCallTag(f: ToolCallFormat, tools: ToolRequest, text?: TagFormat): TagFormat | null {
  if (tools.choice === "none") return null;
  const choice = tools.choice;
  const offered = typeof choice === "object"
    ? tools.functions.filter((t) => t.name === choice.name)
    : tools.functions;
  // A named function is one call of it, as vLLM and OpenAI's clients read a named tool_choice.
  const parallel = tools.parallel && f.parallel && typeof choice !== "object";
  const call = (t: ToolFunction, before = "", after = "") => ({
    type: "tag",
    begin: before + callBegin(f, t.name),
    content: { type: "json_schema", json_schema: t.parameters },
    end: CALL_END + after,
  });
  let forced: TagFormat;
  let triggered: TagFormat;
  const tags = offered.map((t) => call(t, f.open, f.close));
  if (f.perBlock === "one") {
    forced = parallel
      ? { type: "tags_with_separator", tags, separator: f.join, at_least_one: true }
      : { type: "or", elements: tags };
    triggered = { type: "triggered_tags", triggers: [f.trigger], tags, stop_after_first: !parallel };
  } else {
    forced = {
      type: "tag",
      begin: f.open,
      content: {
        type: "tags_with_separator",
        tags: offered.map((t) => call(t)),
        separator: f.join,
        at_least_one: true,
        stop_after_first: !parallel,
      },
      end: f.close,
    };
    triggered = { type: "triggered_tags", triggers: [f.trigger], tags: [forced], stop_after_first: true };
  }
  // xgrammar cannot put an open-ended list of calls (tags_with_separator) in an "or": beside a
  // constrained text, a block-per-call format offers one call.
  const either = f.perBlock === "one" ? { type: "or", elements: tags } : forced;
  const format = choice !== "auto" ? forced : text ? { type: "or", elements: [either, text] } : triggered;
  return { type: "structural_tag", format };
}

/** One call read from the answer; `arguments` is its JSON text as the model wrote it. */
export interface ToolCall {
  id: string;
  name: string;
  arguments: string;
}

/** What a piece of the answer adds: prose, the start of a call, or more of a call's arguments. */
export type ToolCallEvent =
  | { type: "text"; text: string }
  | { type: "call"; index: number; id: string; name: string }
  | { type: "arguments"; index: number; text: string };

/** OpenAI's call ids: "call_" and 24 letters and digits. */
function callId(): string {
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
  const bytes = crypto.getRandomValues(new Uint8Array(24));
  return "call_" + Array.from(bytes, (b) => alphabet[b % alphabet.length]).join("");
}

/** The longest end of `text` that is the start of `word` (text that may yet become it). */
function partialSuffix(text: string, word: string): number {
  for (let n = Math.min(text.length, word.length - 1); n > 0; n--) {
    if (word.startsWith(text.slice(text.length - n))) return n;
  }
  return 0;
}

type State = "text" | "open" | "begin" | "arguments" | "after" | "prose";

/**
 * Reads calls out of an answer as it streams. The grammar has made every call exact (its markers,
 * a listed name, arguments that parse), so the parser follows the format's fixed texts and counts
 * the arguments' brackets; text that cannot become a call's start is passed on as prose at once,
 * whitespace between calls is dropped. An answer cut short (max_tokens, a stop string) keeps what
 * it had: a call's arguments as far as they came, an unfinished marker as prose.
 */
export class ToolCallParser {
  readonly calls: ToolCall[] = [];
  private state: State = "text";
  private buffer = "";
  private depth = 0;
  private inString = false;
  private escaped = false;
  private readonly begins: [string, string][];

  constructor(private readonly format: ToolCallFormat, names: string[]) {
    this.begins = names.map((n) => [callBegin(format, n), n]);
  }

  push(piece: string): ToolCallEvent[] {
    this.buffer += piece;
    const out: ToolCallEvent[] = [];
    while (this.step(out));
    return out;
  }

  /** The answer ended: what was held back, as prose (whitespace after a call dropped). */
  end(): ToolCallEvent[] {
    const rest = this.buffer;
    this.buffer = "";
    const held = this.state === "text" && this.calls.length && !rest.trim() ? "" : rest;
    return held && this.state !== "arguments" ? [{ type: "text", text: held }] : [];
  }

  /** One move on the buffer; false when it must wait for more text. */
  private step(out: ToolCallEvent[]): boolean {
    const f = this.format;
    const b = this.buffer;
    switch (this.state) {
      case "prose":
        if (b) out.push({ type: "text", text: b });
        this.buffer = "";
        return false;
      case "text": {
        const at = b.indexOf(f.trigger);
        const upTo = at >= 0 ? at : b.length - partialSuffix(b, f.trigger);
        // Whitespace before a possible call is held: between calls it is the format's, not prose.
        const ws = b.slice(0, upTo).length - b.slice(0, upTo).trimEnd().length;
        const prose = b.slice(0, upTo - ws);
        if (prose) out.push({ type: "text", text: prose });
        this.buffer = b.slice(prose.length);
        if (at < 0) return false;
        this.buffer = this.buffer.trimStart();
        this.state = "open";
        return true;
      }
      case "open":
        return this.expect([[f.open, "begin"]]);
      case "begin": {
        const found = this.begins.find(([text]) => b.startsWith(text));
        if (found) {
          const call = { id: callId(), name: found[1], arguments: "" };
          this.calls.push(call);
          out.push({ type: "call", index: this.calls.length - 1, id: call.id, name: call.name });
          this.buffer = b.slice(found[0].length);
          this.state = "arguments";
          this.depth = 0;
          return true;
        }
        if (this.begins.some(([text]) => text.startsWith(b))) return false;
        this.state = "prose";
        return true;
      }
      case "arguments": {
        let i = 0;
        let done = false;
        for (; i < b.length && !done; i++) {
          const ch = b[i];
          if (this.inString) {
            if (this.escaped) this.escaped = false;
            else if (ch === "\\") this.escaped = true;
            else if (ch === '"') this.inString = false;
          } else if (ch === '"') this.inString = true;
          else if (ch === "{" || ch === "[") this.depth++;
          else if (ch === "}" || ch === "]") done = --this.depth === 0;
        }
        if (i) {
          const call = this.calls[this.calls.length - 1];
          call.arguments += b.slice(0, i);
          out.push({ type: "arguments", index: this.calls.length - 1, text: b.slice(0, i) });
        }
        this.buffer = b.slice(i);
        if (done) this.state = "after";
        return done;
      }
      case "after":
        return f.perBlock === "one"
          ? this.expect([[CALL_END + f.close, "text"]])
          : this.expect([[CALL_END + f.join, "begin"], [CALL_END + f.close, "text"]]);
    }
  }

  /** Moves past the first of `options` the buffer starts with; waits while one may yet come. */
  private expect(options: [string, State][]): boolean {
    const b = this.buffer;
    const found = options.find(([text]) => b.startsWith(text));
    if (found) {
      this.buffer = b.slice(found[0].length);
      this.state = found[1];
      return true;
    }
    if (options.some(([text]) => text.startsWith(b))) return false;
    this.state = "prose";
    return true;
  }
}

/** A whole answer read at once: its prose (trimmed) and its calls. */
export function parseToolCalls(
  format: ToolCallFormat,
  names: string[],
  text: string,
): { content: string; calls: ToolCall[] } {
  const parser = new ToolCallParser(format, names);
  const events = [...parser.push(text), ...parser.end()];
  const content = events.map((e) => (e.type === "text" ? e.text : "")).join("");
  return { content: parser.calls.length ? content.trim() : content, calls: parser.calls };
}

/** Tools as transformers hands them to a template: OpenAI's `{type: "function", function}` objects. */
export const templateTools = (tools: ToolFunction[]) => tools.map((t) => ({ type: "function", function: t }));

/**
 * The default for a template that knows no tools: the functions and the Hermes call format
 * explained in the system message, earlier calls written back as the model would write them, and
 * tool results passed as the user's turn (consecutive results in one turn).
 */
export function inlineTools(messages: ChatMessage[], tools: ToolFunction[]): ChatMessage[] {
  const f = HERMES;
  const listed = templateTools(tools).map(pyJson).join("\n");
  const guide =
    "You may call functions to answer. They are listed as JSON, one a line, between <tools> and " +
    `</tools>:\n<tools>\n${listed}\n</tools>\nTo call one, write its name and arguments as one JSON ` +
    `object between ${f.trigger} and ${f.close.trim()}:\n${f.open}${callBegin(f, "<name>")}` +
    `<arguments as a JSON object>${CALL_END}${f.close}\nA function's result comes back between ` +
    "<tool_response> and </tool_response>.";
  const out: ChatMessage[] = [];
  let results: ChatMessage | null = null;
  for (const m of messages) {
    if (m.role === "tool") {
      const result = `<tool_response>\n${m.content}\n</tool_response>`;
      if (results) results.content += "\n" + result;
      else out.push(results = { role: "user", content: result });
      continue;
    }
    results = null;
    if (m.tool_calls?.length) {
      const calls = m.tool_calls.map((c) =>
        f.open + callBegin(f, c.function.name) + pyJson(c.function.arguments) + CALL_END + f.close
      );
      out.push({ role: m.role, content: [m.content, ...calls].filter(Boolean).join(f.join) });
    } else out.push({ ...m });
  }
  if (out[0]?.role === "system") out[0] = { ...out[0], content: `${out[0].content}\n\n${guide}` };
  else out.unshift({ role: "system", content: guide });
  return out;
}
