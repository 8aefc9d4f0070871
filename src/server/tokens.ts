import type { Context } from "hono";
import { z } from "zod";
import { InputError } from "../errors.ts";
import { maxPromptChars, promptChars, requireChat } from "../serving/completion.ts";
import type { ModelHost } from "../serving/host.ts";
import { message, toChatMessages, tool, toToolFunctions } from "./chat.ts";
import { readBody } from "./body.ts";
import type { AppEnv } from "./logging.ts";

/**
 * vLLM's /tokenize body (a prompt, or chat messages and the tools they offer rendered with the
 * model's template) and /detokenize
 * body (token ids); `model` and fields vLLM knows and these routes do not (`add_special_tokens`) are
 * ignored, as docs/api.md says of every route.
 */
const tokenizeSchema = z.object({
  model: z.string().optional(),
  prompt: z.string().optional(),
  messages: z.array(message).min(1).optional(),
  tools: z.array(tool).max(128).nullable().optional(),
  add_generation_prompt: z.boolean().default(true),
}).superRefine((b, ctx) => {
  if ((b.prompt === undefined) === (b.messages === undefined)) {
    ctx.addIssue({
      code: "custom",
      path: ["prompt"],
      message: b.prompt === undefined ? "give prompt or messages" : "give prompt or messages, not both",
    });
  }
});
const detokenizeSchema = z.object({
  model: z.string().optional(),
  tokens: z.array(z.number().int().nonnegative()).max(1 << 20),
});

/**
 * POST /tokenize and POST /detokenize: the model's own tokenizer, in the tokenizer worker (a long
 * prompt never holds the serving thread), with the limits completions use.
 */
export function tokenRoutes(host: ModelHost) {
  return {
    tokenize: async (c: Context<AppEnv>) => {
      const body = await readBody(c, tokenizeSchema);
      const config = host.requireReady();
      const messages = body.messages ? toChatMessages(body.messages) : null;
      const chars = promptChars(messages ? { messages } : { text: body.prompt! });
      if (chars > maxPromptChars(host)) {
        throw new InputError(
          `${chars} characters is more than any prompt this model takes (${maxPromptChars(host)})`,
          messages ? "messages" : "prompt",
        );
      }
      if (messages) requireChat(host);
      const tokens = messages
        ? await host.tokenizer!.encodeChat(
          messages,
          body.tools?.length ? toToolFunctions(body.tools) : undefined,
          body.add_generation_prompt,
        )
        : await host.tokenizer!.encode(body.prompt!);
      return c.json({ count: tokens.length, max_model_len: config.maxPositions, tokens });
    },
    detokenize: async (c: Context<AppEnv>) => {
      const body = await readBody(c, detokenizeSchema);
      const config = host.requireReady();
      const bad = body.tokens.find((id) => id >= config.vocabSize);
      if (bad !== undefined) {
        throw new InputError(
          `token id ${bad} is out of range (vocabulary size ${config.vocabSize})`,
          "tokens",
        );
      }
      return c.json({ prompt: await host.tokenizer!.decode(body.tokens) });
    },
  };
}
