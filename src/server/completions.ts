import type { Context } from "hono";
import { streamSSE } from "hono/streaming";
import { z } from "zod";
import { InputError } from "../errors.ts";
import { checkPromptFits } from "../runtime/context.ts";
import { generate, type GenerationSummary } from "../runtime/generate.ts";
import type { ModelHost } from "../runtime/host.ts";
import { generationFields, toGenerateParams } from "../runtime/params.ts";
import { readBody } from "./errors.ts";

/** OpenAI's /v1/completions body, with top_k and repetition_penalty as the usual extensions. */
export const completionSchema = z.object({
  model: z.string().optional(),
  prompt: z.union([
    z.string(),
    z.array(z.string()).length(1, "only one prompt per request is supported"),
    z.array(z.number().int().nonnegative()).min(1),
  ]),
  stream: z.boolean().default(false),
  n: z.literal(1, "only n = 1 is supported").optional(),
  echo: z.literal(false, "echo is not supported").optional(),
  logprobs: z.null("logprobs are not supported").optional(),
  presence_penalty: z.literal(0, "presence_penalty is not supported (use repetition_penalty)").optional(),
  frequency_penalty: z.literal(0, "frequency_penalty is not supported (use repetition_penalty)").optional(),
  stream_options: z.object({ include_usage: z.boolean().optional() }).optional(),
  user: z.string().optional(),
  ...generationFields,
}).strict();

type CompletionRequest = z.infer<typeof completionSchema>;

function promptIds(host: ModelHost, body: CompletionRequest): number[] {
  const { tokenizer, checkpoint } = host.assets!;
  const p = body.prompt;
  const ids = typeof p === "string"
    ? tokenizer.encode(p)
    : typeof p[0] === "string"
    ? tokenizer.encode(p[0] as string)
    : (p as number[]);
  const vocab = checkpoint.config.vocabSize;
  const bad = ids.find((id) => id >= vocab);
  if (bad !== undefined) {
    throw new InputError(`prompt: token id ${bad} is out of range (vocabulary size ${vocab})`);
  }
  checkPromptFits(ids.length, checkpoint.config.maxPositions);
  return ids;
}

function usage(s: GenerationSummary) {
  return {
    prompt_tokens: s.promptTokens,
    completion_tokens: s.completionTokens,
    total_tokens: s.promptTokens + s.completionTokens,
  };
}

/** "cancelled" is ours alone; OpenAI clients only know stop and length. */
const finishReason = (s: GenerationSummary) => (s.finishReason === "cancelled" ? "stop" : s.finishReason);

export function completionsHandler(host: ModelHost) {
  return async (c: Context) => {
    const body = await readBody(c, completionSchema);
    if (host.state !== "ready") throw new InputError("model is still loading", 409);
    const ids = promptIds(host, body);
    const lease = host.lease();
    const { instance } = lease;
    const cfg = host.assets!.checkpoint.config;
    const id = `cmpl-${crypto.randomUUID()}`;
    const created = Math.floor(Date.now() / 1000);
    const model = host.assets!.name;
    const abort = new AbortController();
    const run = generate({
      session: instance.session,
      tokenizer: host.assets!.tokenizer,
      promptIds: ids,
      params: toGenerateParams(body),
      eosTokenIds: cfg.eosTokenIds,
      maxPositions: cfg.maxPositions,
      signal: abort.signal,
    });
    const chunk = (text: string, finish: string | null, extra: Record<string, unknown> = {}) => ({
      id,
      object: "text_completion",
      created,
      model,
      plan: instance.planId,
      choices: [{ text, index: 0, logprobs: null, finish_reason: finish }],
      ...extra,
    });
    c.header("x-fusedge-plan", instance.planId);

    if (!body.stream) {
      try {
        let r = await run.next();
        while (!r.done) r = await run.next();
        return c.json(chunk(r.value.text, finishReason(r.value), { usage: usage(r.value) }));
      } finally {
        lease.release();
      }
    }

    return streamSSE(c, async (stream) => {
      stream.onAbort(() => abort.abort());
      try {
        let r = await run.next();
        while (!r.done) {
          await stream.writeSSE({ data: JSON.stringify(chunk(r.value.text, null)) });
          r = await run.next();
        }
        if (!stream.aborted) {
          await stream.writeSSE({
            data: JSON.stringify(chunk("", finishReason(r.value), { usage: usage(r.value) })),
          });
          await stream.writeSSE({ data: "[DONE]" });
        }
      } finally {
        await run.return(undefined as never);
        lease.release();
      }
    }, async (err, stream) => {
      console.error(`stream ${id} failed:`, err);
      await stream.writeSSE({
        data: JSON.stringify({ error: { message: err.message, type: "server_error" } }),
      });
    });
  };
}
