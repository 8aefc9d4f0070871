import { z } from "zod";
import type { GenerateParams } from "../decode/generate.ts";
import type { GrammarSpec } from "../sampling/grammar.ts";
import { InputError } from "../errors.ts";

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

/**
 * What an answer may be constrained to: OpenAI's `response_format` (JSON, or JSON under a schema)
 * and vLLM's guided decoding fields. At most one of them a request.
 */
export const constraintFields = {
  response_format: z.discriminatedUnion("type", [
    z.object({ type: z.literal("text") }),
    z.object({ type: z.literal("json_object") }),
    z.object({
      type: z.literal("json_schema"),
      json_schema: z.object({
        name: z.string().max(64).optional(),
        description: z.string().optional(),
        schema: z.record(z.string(), z.unknown()).default({}),
        strict: z.boolean().nullable().optional(),
      }),
    }),
  ]).nullable().optional().describe("text, json_object, or json_schema {name, schema, strict}"),
  guided_json: z.union([z.string(), z.record(z.string(), z.unknown())]).optional().describe(
    "a JSON schema the answer must follow",
  ),
  guided_regex: z.string().min(1).max(10_000).optional().describe(
    "a regular expression the answer must match",
  ),
  guided_choice: z.array(z.string().min(1).max(1000)).min(1).max(1000).optional().describe(
    "the answer is one of these strings",
  ),
  guided_grammar: z.string().min(1).max(100_000).optional().describe(
    "an EBNF grammar the answer must follow",
  ),
};

/** Which model answers: the active plan, or the unfused model beside it (to compare the two). */
export const planField = {
  plan: z.enum(["active", "unfused"]).default("active").describe(
    "active (the served plan) or unfused (the model without fusion, built beside it on first use)",
  ),
};

type ConstraintBody = { [K in keyof typeof constraintFields]?: z.infer<(typeof constraintFields)[K]> };

/** The grammar a body asks for, if any; two at once is bad input naming the second. */
export function toGrammar(body: ConstraintBody): GrammarSpec | undefined {
  const specs: GrammarSpec[] = [];
  const rf = body.response_format;
  if (rf?.type === "json_object") specs.push({ field: "response_format", type: "json" });
  if (rf?.type === "json_schema") {
    specs.push({
      field: "response_format",
      type: "json_schema",
      schema: JSON.stringify(rf.json_schema.schema),
    });
  }
  const gj = body.guided_json;
  if (gj !== undefined) {
    specs.push({
      field: "guided_json",
      type: "json_schema",
      schema: typeof gj === "string" ? gj : JSON.stringify(gj),
    });
  }
  if (body.guided_regex !== undefined) {
    specs.push({ field: "guided_regex", type: "regex", pattern: body.guided_regex });
  }
  if (body.guided_choice) specs.push({ field: "guided_choice", type: "choice", choices: body.guided_choice });
  if (body.guided_grammar) {
    specs.push({ field: "guided_grammar", type: "ebnf", grammar: body.guided_grammar });
  }
  if (specs.length > 1) {
    throw new InputError(`one constraint a request: ${specs[0].field} is given already`, specs[1].field);
  }
  return specs[0];
}
