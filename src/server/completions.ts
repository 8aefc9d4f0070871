import { z } from "zod";
import {
  constraintFields,
  generationFields,
  planField,
  toGenerateParams,
  toGrammar,
} from "../requests/generation.ts";
import { MAX_CHOICES } from "../serving/completion.ts";
import { mapSliced } from "../yield.ts";
import { MAX_TOP_LOGPROBS, type PromptLogprob, type TokenLogprob } from "../sampling/logprobs.ts";
import type { ChoiceWriter, Endpoint } from "./completion_route.ts";

/**
 * OpenAI's /v1/completions body, with top_k and repetition_penalty as the usual extensions. Fields
 * it does not know are ignored, as OpenAI ignores them.
 */
export const completionSchema = (maxTokensCap?: number) =>
  z.object({
    model: z.string().optional(),
    prompt: z.union([
      z.string(),
      z.array(z.string()).min(1).max(MAX_CHOICES),
      z.array(z.number().int().nonnegative()).min(1),
      z.array(z.array(z.number().int().nonnegative()).min(1)).min(1).max(MAX_CHOICES),
    ]).describe("a string, token ids, or a list of either (each completed n times)"),
    stream: z.boolean().default(false),
    n: z.number().int().min(1).max(MAX_CHOICES).default(1),
    echo: z.boolean().default(false).describe("the prompt before the completion (with its logprobs)"),
    logprobs: z.number().int().min(0).max(MAX_TOP_LOGPROBS).nullable().optional().describe(
      "log-probabilities of each token and of this many alternatives",
    ),
    stream_options: z.object({ include_usage: z.boolean().optional() }).nullable().optional(),
    user: z.string().optional(),
    ...constraintFields,
    ...planField,
    ...generationFields(maxTokensCap),
  });

type CompletionRequest = z.infer<ReturnType<typeof completionSchema>>;

/**
 * OpenAI's legacy logprobs block: parallel lists, alternatives as a token -> logprob map, and each
 * token's offset in the text (prompt included, as the API counts it).
 */
async function logprobBlock(lps: (TokenLogprob | PromptLogprob)[], offset: { at: number }) {
  return {
    tokens: lps.map((l) => l.token),
    token_logprobs: lps.map((l) => l.logprob),
    top_logprobs: await mapSliced(
      lps,
      (l) => (l.top === null ? null : Object.fromEntries(l.top.map((t) => [t.token, t.logprob]))),
    ),
    text_offset: lps.map((l) => {
      const at = offset.at;
      offset.at += l.token.length;
      return at;
    }),
  };
}

export const completionsEndpoint: Endpoint<ReturnType<typeof completionSchema>> = {
  schema: completionSchema,
  object: "text_completion",
  chunkObject: "text_completion",
  idPrefix: "cmpl",
  toJob(body: CompletionRequest, limits) {
    const p = body.prompt;
    const prompts = typeof p === "string"
      ? [{ text: p }]
      : typeof p[0] === "string"
      ? (p as string[]).map((text) => ({ text }))
      : typeof p[0] === "number"
      ? [{ ids: p as number[] }]
      : (p as number[][]).map((ids) => ({ ids }));
    const logprobs = body.logprobs ?? undefined;
    return {
      prompts,
      params: {
        ...toGenerateParams(body),
        logprobs,
        promptLogprobs: body.echo && logprobs !== undefined,
        grammar: toGrammar(body),
      },
      n: body.n,
      timeoutMs: limits.requestTimeoutMs,
      plan: body.plan,
      promptText: body.echo || logprobs !== undefined,
    };
  },
  writer(body, started): ChoiceWriter {
    const texts = started.promptTexts ?? [];
    const promptText = (index: number) => texts[Math.floor(index / body.n)] ?? "";
    const echoed = (index: number) => body.echo ? promptText(index) : "";
    // Offsets count from the start of the choice's prompt: its first token is at the prompt's length.
    const offsets = Array.from(
      { length: started.promptTokens.length * body.n },
      (_, i) => ({ at: body.echo ? 0 : promptText(i).length }),
    );
    const wanted = body.logprobs !== undefined && body.logprobs !== null;
    const block = (index: number, lps: (TokenLogprob | PromptLogprob)[]) =>
      wanted ? logprobBlock(lps, offsets[index]) : Promise.resolve(null);
    const choice = (index: number, text: string, logprobs: unknown, finish: string | null) => ({
      text,
      index,
      logprobs,
      finish_reason: finish,
    });
    return {
      opening: async (index, prompt) =>
        echoed(index) ? choice(index, echoed(index), await block(index, prompt ?? []), null) : null,
      piece: async (index, text, lps) => [choice(index, text, await block(index, lps ?? []), null)],
      flush: () => Promise.resolve([]),
      end: (index, finish) => choice(index, "", null, finish),
      whole: async (index, text, lps, prompt, finish) =>
        choice(
          index,
          echoed(index) + text,
          await block(index, [...(body.echo ? prompt ?? [] : []), ...(lps ?? [])]),
          finish,
        ),
    };
  },
};
