import { MAX_CHOICES } from "../serving/completion.ts";
import { mapSliced } from "../yield.ts";
import { z } from "zod";
import {
  constraintFields,
  generationFields,
  LIMITS,
  planField,
  toGenerateParams,
  toGrammar,
} from "../requests/generation.ts";
import { MAX_TOP_LOGPROBS, type TokenLogprob } from "../sampling/logprobs.ts";
import type { ChatMessage } from "../model/chat_template.ts";
import {
  parseToolCalls,
  type ToolCallEvent,
  ToolCallParser,
  type ToolFunction,
  type ToolRequest,
} from "../model/tool_calls.ts";
import type { ChoiceWriter, Endpoint } from "./completion_route.ts";

/** Text content as a string or as OpenAI's list of parts; only text parts mean anything to this model. */
const content = z.union([
  z.string(),
  z.array(
    z.object({ type: z.literal("text", "only text content parts are supported"), text: z.string() }),
  ),
]);

const isJson = (s: string) => {
  try {
    JSON.parse(s);
    return true;
  } catch {
    return false;
  }
};

/** OpenAI's function names: what a call's id in a template and a call marker can hold. */
const functionName = z.string().regex(/^[a-zA-Z0-9_-]{1,64}$/, "1-64 letters, digits, _ or -");

/** An assistant's earlier call, sent back with the conversation: its arguments are JSON text. */
const toolCall = z.object({
  id: z.string().max(256),
  type: z.literal("function"),
  function: z.object({ name: functionName, arguments: z.string().refine(isJson, "not JSON") }),
});

export const message = z.object({
  role: z.enum(["system", "developer", "user", "assistant", "tool"]),
  content: content.nullable().optional(),
  name: z.string().optional(),
  tool_calls: z.array(toolCall).max(128).nullable().optional(),
  tool_call_id: z.string().max(256).optional(),
}).refine((m) => m.role !== "tool" || m.tool_call_id !== undefined, {
  message: "a tool message needs the id of the call it answers",
  path: ["tool_call_id"],
}).refine((m) => !m.tool_calls?.length || m.role === "assistant", {
  message: "only an assistant's message holds tool calls",
  path: ["tool_calls"],
});

/** A function the model may call; `parameters` is the JSON schema of its arguments (an object). */
export const tool = z.object({
  type: z.literal("function"),
  function: z.object({
    name: functionName,
    description: z.string().max(10_000).optional(),
    parameters: z.record(z.string(), z.unknown()).refine(
      (p) => p.type === undefined || p.type === "object",
      "a function's arguments are an object: its schema's type is \"object\"",
    ).optional(),
    strict: z.boolean().nullable().optional(),
  }),
});

const toolChoice = z.union([
  z.enum(["none", "auto", "required"]),
  z.object({ type: z.literal("function"), function: z.object({ name: functionName }) }),
]);

/** Present and not empty: a feature this server does not have, refused rather than silently ignored. */
const unsupported = () =>
  z.unknown().optional().refine((v) => v === undefined || v === null || (Array.isArray(v) && !v.length), {
    message: "not supported by this server",
  });

/**
 * OpenAI's /v1/chat/completions body. The conversation is rendered with the model's chat template;
 * sampling fields are those of /v1/completions. Unknown fields are ignored, as OpenAI ignores them;
 * known ones this server cannot honour (tools, logit bias) are refused.
 */
export const chatSchema = (maxTokensCap?: number) =>
  z.object({
    model: z.string().optional(),
    messages: z.array(message).min(1),
    stream: z.boolean().default(false),
    n: z.number().int().min(1).max(MAX_CHOICES).default(1),
    logprobs: z.boolean().nullable().optional().describe("log-probabilities of the generated tokens"),
    top_logprobs: z.number().int().min(0).max(MAX_TOP_LOGPROBS).nullable().optional().describe(
      "alternatives per position (needs logprobs: true)",
    ),
    max_completion_tokens: z.number().int().min(1).max(maxTokensCap ?? Infinity).nullable().optional()
      .describe("OpenAI's newer name for max_tokens"),
    stream_options: z.object({ include_usage: z.boolean().optional() }).nullable().optional(),
    tools: z.array(tool).max(128).nullable().optional().describe("functions the model may call"),
    tool_choice: toolChoice.nullable().optional().describe(
      "auto (default), none, required, or {type: function, function: {name}}",
    ),
    parallel_tool_calls: z.boolean().nullable().optional().describe("more than one call an answer"),
    functions: unsupported().describe("the deprecated form of tools: give tools"),
    logit_bias: z.record(z.string(), z.number()).nullable().optional().refine(
      (v) => !v || Object.keys(v).length === 0,
      "not supported by this server",
    ),
    ...constraintFields,
    ...planField,
    user: z.string().optional(),
    // A chat answer runs to its end of turn: by default only the context (and the cap) bound it.
    ...generationFields(maxTokensCap, 1, maxTokensCap ?? LIMITS.maxTokens),
  }).refine((b) => !b.top_logprobs || b.logprobs === true, {
    message: "needs logprobs: true",
    path: ["top_logprobs"],
  }).refine((b) => new Set(b.tools?.map((t) => t.function.name)).size === (b.tools?.length ?? 0), {
    message: "two functions have one name",
    path: ["tools"],
  }).refine((b) => b.tool_choice !== "required" || !!b.tools?.length, {
    message: "required needs tools",
    path: ["tool_choice"],
  }).refine((b) => {
    const c = b.tool_choice;
    return !c || typeof c !== "object" || !!b.tools?.some((t) => t.function.name === c.function.name);
  }, {
    message: "names no function in tools",
    path: ["tool_choice"],
  });

type ChatRequest = z.infer<ReturnType<typeof chatSchema>>;

const text = (c: z.infer<typeof content> | null | undefined) =>
  typeof c === "string" ? c : (c ?? []).map((p) => p.text).join("");

/**
 * Messages as the template sees them: OpenAI's "developer" is the system role renamed; text parts
 * joined; earlier calls' arguments as objects, as transformers hands them to templates (which test
 * `'tool_calls' in message`: the key is there only when there are calls).
 */
export function toChatMessages(messages: z.infer<typeof message>[]): ChatMessage[] {
  return messages.map((m) => ({
    role: m.role === "developer" ? "system" : m.role,
    content: text(m.content),
    ...(m.name ? { name: m.name } : {}),
    ...(m.tool_call_id !== undefined ? { tool_call_id: m.tool_call_id } : {}),
    ...(m.tool_calls?.length
      ? {
        tool_calls: m.tool_calls.map((c) => ({
          id: c.id,
          type: c.type,
          function: { name: c.function.name, arguments: JSON.parse(c.function.arguments) },
        })),
      }
      : {}),
  }));
}

/** Functions as the runtime takes them: no parameters is an object with none. */
export const toToolFunctions = (tools: z.infer<typeof tool>[]): ToolFunction[] =>
  tools.map(({ function: f }) => ({
    name: f.name,
    ...(f.description !== undefined ? { description: f.description } : {}),
    parameters: f.parameters ?? { type: "object", properties: {} },
  }));

/** The request's tools as the runtime takes them; none when it offers no function. */
function toToolRequest(body: ChatRequest): ToolRequest | undefined {
  if (!body.tools?.length) return undefined;
  const c = body.tool_choice ?? "auto";
  return {
    functions: toToolFunctions(body.tools),
    choice: typeof c === "object" ? { name: c.function.name } : c,
    parallel: body.parallel_tool_calls ?? true,
  };
}

/** OpenAI's chat logprobs: one entry per token, its alternatives in the same shape. */
const chatLogprobs = async (lps: TokenLogprob[]) => ({
  content: await mapSliced(lps, (l) => ({
    token: l.token,
    logprob: l.logprob,
    bytes: l.bytes,
    top_logprobs: l.top.map((t) => ({ token: t.token, logprob: t.logprob, bytes: t.bytes })),
  })),
});

export const chatEndpoint: Endpoint<ReturnType<typeof chatSchema>> = {
  schema: chatSchema,
  object: "chat.completion",
  chunkObject: "chat.completion.chunk",
  idPrefix: "chatcmpl",
  toJob(body: ChatRequest, limits) {
    const messages = toChatMessages(body.messages);
    const params = toGenerateParams({ ...body, max_tokens: body.max_completion_tokens ?? body.max_tokens });
    return {
      prompts: [{ messages }],
      params: {
        ...params,
        logprobs: body.logprobs ? body.top_logprobs ?? 0 : undefined,
        grammar: toGrammar(body),
      },
      n: body.n,
      timeoutMs: limits.requestTimeoutMs,
      plan: body.plan,
      tools: toToolRequest(body),
    };
  },
  writer(body, started): ChoiceWriter {
    const block = (
      lps: TokenLogprob[] | null | undefined,
    ) => (body.logprobs ? chatLogprobs(lps ?? []) : Promise.resolve(null));
    const calls = started.toolCalls;
    if (!calls) {
      return {
        opening,
        piece: async (
          index,
          t,
          lps,
        ) => [{ index, delta: { content: t }, logprobs: await block(lps), finish_reason: null }],
        flush: () => Promise.resolve([]),
        end: (index, finish) => ({ index, delta: {}, logprobs: null, finish_reason: finish }),
        whole: async (index, t, lps, _prompt, finish) => ({
          index,
          message: { role: "assistant", content: t, refusal: null },
          logprobs: await block(lps),
          finish_reason: finish,
        }),
      };
    }
    // Each choice's calls are read from its text as it streams; logprobs of text held back (a call
    // marker not yet whole) ride on the next delta.
    const parsers = new Map<number, { parser: ToolCallParser; held: TokenLogprob[] }>();
    const of = (index: number) => {
      let p = parsers.get(index);
      if (!p) parsers.set(index, p = { parser: new ToolCallParser(calls.format, calls.names), held: [] });
      return p;
    };
    const deltas = async (index: number, events: ToolCallEvent[], lps: TokenLogprob[] | undefined) => {
      const p = of(index);
      p.held.push(...(lps ?? []));
      if (!events.length) return [];
      const logprobs = await block(p.held.splice(0));
      return events.map((e, i) => ({
        index,
        delta: toolDelta(e),
        logprobs: i === 0 ? logprobs : null,
        finish_reason: null,
      }));
    };
    // OpenAI's reason for an answer that ends in calls; one cut short stays "length".
    const reason = (finish: string, calls: number) => finish === "stop" && calls ? "tool_calls" : finish;
    return {
      opening,
      piece: (index, t, lps) => deltas(index, of(index).parser.push(t), lps),
      flush: async (index) => {
        const p = of(index);
        const events = p.parser.end();
        if (!events.length && body.logprobs && p.held.length) events.push({ type: "text", text: "" });
        return await deltas(index, events, []);
      },
      end: (index, finish) => ({
        index,
        delta: {},
        logprobs: null,
        finish_reason: reason(finish, of(index).parser.calls.length),
      }),
      whole: async (index, t, lps, _prompt, finish) => {
        const { content, calls: found } = parseToolCalls(calls.format, calls.names, t);
        return {
          index,
          message: {
            role: "assistant",
            content: found.length && !content ? null : content,
            refusal: null,
            ...(found.length
              ? {
                tool_calls: found.map((c) => ({
                  id: c.id,
                  type: "function",
                  function: { name: c.name, arguments: c.arguments },
                })),
              }
              : {}),
          },
          logprobs: await block(lps),
          finish_reason: reason(finish, found.length),
        };
      },
    };
  },
};

/** A chat stream's first delta for a choice: the role. */
const opening = (index: number) =>
  Promise.resolve({ index, delta: { role: "assistant", content: "" }, logprobs: null, finish_reason: null });

/** A parser event as OpenAI streams it: content, a call's id and name, or more of its arguments. */
function toolDelta(e: ToolCallEvent): Record<string, unknown> {
  switch (e.type) {
    case "text":
      return { content: e.text };
    case "call":
      return {
        tool_calls: [{
          index: e.index,
          id: e.id,
          type: "function",
          function: { name: e.name, arguments: "" },
        }],
      };
    case "arguments":
      return { tool_calls: [{ index: e.index, function: { arguments: e.text } }] };
  }
}
