import { MAX_CHOICES } from "../runtime/completion.ts";
import { mapSliced } from "../runtime/yield.ts";
import { z } from "zod";
import {
  constraintFields,
  generationFields,
  LIMITS,
  toGenerateParams,
  toGrammar,
} from "../api/generation.ts";
import { MAX_TOP_LOGPROBS, type TokenLogprob } from "../runtime/logprobs.ts";
import type { ChatMessage } from "../model/chat_template.ts";
import type { ChoiceWriter, Endpoint } from "./completion_route.ts";

/** Text content as a string or as OpenAI's list of parts; only text parts mean anything to this model. */
const content = z.union([
  z.string(),
  z.array(
    z.object({ type: z.literal("text", "only text content parts are supported"), text: z.string() }),
  ),
]);

export const message = z.object({
  role: z.enum(["system", "developer", "user", "assistant", "tool"]),
  content: content.nullable().optional(),
  name: z.string().optional(),
});

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
    tools: unsupported(),
    functions: unsupported(),
    logit_bias: z.record(z.string(), z.number()).nullable().optional().refine(
      (v) => !v || Object.keys(v).length === 0,
      "not supported by this server",
    ),
    ...constraintFields,
    user: z.string().optional(),
    // A chat answer runs to its end of turn: by default only the context (and the cap) bound it.
    ...generationFields(maxTokensCap, 1, maxTokensCap ?? LIMITS.maxTokens),
  }).refine((b) => !b.top_logprobs || b.logprobs === true, {
    message: "needs logprobs: true",
    path: ["top_logprobs"],
  });

type ChatRequest = z.infer<ReturnType<typeof chatSchema>>;

const text = (c: z.infer<typeof content> | null | undefined) =>
  typeof c === "string" ? c : (c ?? []).map((p) => p.text).join("");

/** Messages as the template sees them: OpenAI's "developer" is the system role renamed; text parts joined. */
export function toChatMessages(messages: z.infer<typeof message>[]): ChatMessage[] {
  return messages.map((m) => ({
    role: m.role === "developer" ? "system" : m.role,
    content: text(m.content),
    ...(m.name ? { name: m.name } : {}),
  }));
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
    };
  },
  writer(body): ChoiceWriter {
    const block = (
      lps: TokenLogprob[] | null | undefined,
    ) => (body.logprobs ? chatLogprobs(lps ?? []) : Promise.resolve(null));
    return {
      opening: (index) =>
        Promise.resolve({
          index,
          delta: { role: "assistant", content: "" },
          logprobs: null,
          finish_reason: null,
        }),
      piece: async (index, t, lps) => ({
        index,
        delta: { content: t },
        logprobs: await block(lps),
        finish_reason: null,
      }),
      end: (index, finish) => ({ index, delta: {}, logprobs: null, finish_reason: finish }),
      whole: async (index, t, lps, _prompt, finish) => ({
        index,
        message: { role: "assistant", content: t, refusal: null },
        logprobs: await block(lps),
        finish_reason: finish,
      }),
    };
  },
};
