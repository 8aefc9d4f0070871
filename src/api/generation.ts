import { z } from "zod";
import type { GenerateParams } from "../runtime/generate.ts";

/** Upper bounds a request may not exceed, whatever the model's context allows. */
export const LIMITS = {
  /** Default cap on max_tokens; `serve --max-tokens-cap` changes it. */
  maxTokens: 4096,
  maxStopSequences: 4,
  maxStopLength: 64,
};

/**
 * Generation parameters under their OpenAI names: the HTTP body uses them as they are, and the CLI's
 * --flags are the same keys (`--max-tokens` is `max_tokens`), so both reject the same values with
 * the same messages. `temperatureDefault` differs: OpenAI samples at 1, the CLI is greedy.
 */
export const generationFields = (
  maxTokensCap = LIMITS.maxTokens,
  temperatureDefault = 1,
  maxTokensDefault = 16,
) => ({
  max_tokens: z.number().int().min(1).max(maxTokensCap).default(Math.min(maxTokensDefault, maxTokensCap))
    .describe("tokens to generate at most"),
  temperature: z.number().min(0).max(5).default(temperatureDefault).describe("0 is greedy"),
  top_p: z.number().gt(0).max(1).default(1).describe("nucleus sampling mass"),
  top_k: z.number().int().min(0).default(0).describe("0 disables top-k"),
  repetition_penalty: z.number().gt(0).max(10).default(1).describe("1 disables the penalty"),
  presence_penalty: z.number().min(-2).max(2).default(0).describe(
    "subtracted from the logit of every token already generated",
  ),
  frequency_penalty: z.number().min(-2).max(2).default(0).describe(
    "subtracted per time a token was already generated",
  ),
  seed: z.number().int().min(0).max(2 ** 32 - 1).optional().describe("reproducible sampling"),
  stop: z.union([
    z.string().min(1).max(LIMITS.maxStopLength),
    z.array(z.string().min(1).max(LIMITS.maxStopLength)).max(LIMITS.maxStopSequences),
  ]).optional().describe("stop sequences"),
});

export const generationSchema = z.object(generationFields());
export type GenerationRequest = z.infer<typeof generationSchema>;

export function toGenerateParams(r: GenerationRequest): GenerateParams {
  return {
    maxTokens: r.max_tokens,
    temperature: r.temperature,
    topP: r.top_p,
    topK: r.top_k,
    repetitionPenalty: r.repetition_penalty,
    presencePenalty: r.presence_penalty,
    frequencyPenalty: r.frequency_penalty,
    seed: r.seed,
    stop: r.stop === undefined ? [] : typeof r.stop === "string" ? [r.stop] : r.stop,
  };
}
