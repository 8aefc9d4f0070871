import type { Context } from "hono";
import { streamSSE } from "hono/streaming";
import { z } from "zod";
import { InputError } from "../errors.ts";
import { checkPromptFits } from "../runtime/context.ts";
import { generate, type GenerationSummary } from "../runtime/generate.ts";
import type { ModelHost } from "../runtime/host.ts";
import { generationFields, toGenerateParams } from "../runtime/params.ts";
import { QueueFullError, type Scheduler } from "../runtime/scheduler.ts";
import { readBody } from "./errors.ts";
import type { RequestLog } from "./logging.ts";
import type { Metrics } from "./metrics.ts";

/** OpenAI's /v1/completions body, with top_k and repetition_penalty as the usual extensions. */
export const completionSchema = (maxTokensCap?: number) =>
  z.strictObject({
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
    ...generationFields(maxTokensCap),
  });

type CompletionRequest = z.infer<ReturnType<typeof completionSchema>>;

export interface CompletionLimits {
  maxTokensCap: number;
  /** Wall-clock limit of one generation, in milliseconds. */
  requestTimeoutMs: number;
}

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
const finishReason = (s: GenerationSummary) => (s.finishReason === "cancelled" ? "length" : s.finishReason);

export interface CompletionDeps {
  host: ModelHost;
  scheduler: Scheduler;
  metrics: Metrics;
  limits: CompletionLimits;
}

/**
 * The request lifecycle: validate, admit (or 429), lease the active plan's session, generate with
 * the client's disconnect and the wall-clock limit both wired to one abort signal, then release.
 */
export function completionsHandler({ host, scheduler, metrics, limits }: CompletionDeps) {
  const schema = completionSchema(limits.maxTokensCap);
  return async (c: Context) => {
    const body = await readBody(c, schema);
    if (host.state !== "ready") throw new InputError("model is still loading", 409);
    const ids = promptIds(host, body);
    const abort = new AbortController();
    // A non-streamed request learns of a disconnect from the request's signal; the listener goes
    // once the answer is ready, since Deno also aborts that signal after a successful response.
    const clientGone = c.req.raw.signal;
    const onGone = () => abort.abort();
    if (!body.stream) clientGone.addEventListener("abort", onGone, { once: true });
    const freeSlot = await scheduler.acquire(abort.signal).catch((e) => {
      if (e instanceof QueueFullError) metrics.rejected.inc();
      throw e;
    });
    const lease = host.lease();
    const timer = setTimeout(() => abort.abort(), limits.requestTimeoutMs);
    const { instance } = lease;
    const cfg = host.assets!.checkpoint.config;
    const id = `cmpl-${crypto.randomUUID()}`;
    const created = Math.floor(Date.now() / 1000);
    const model = host.assets!.name;
    const log = c.get("log") as RequestLog;
    log.set({ plan: instance.planId, prompt_tokens: ids.length, stream: body.stream });
    const start = performance.now();
    let last = 0;
    const onToken = () => {
      const now = performance.now();
      if (last === 0) metrics.ttft.observe((now - start) / 1000);
      else metrics.interToken.observe((now - last) / 1000);
      last = now;
    };
    const run = generate({
      session: instance.session,
      tokenizer: host.assets!.tokenizer,
      promptIds: ids,
      params: toGenerateParams(body),
      eosTokenIds: cfg.eosTokenIds,
      maxPositions: cfg.maxPositions,
      signal: abort.signal,
    });
    const finish = (summary: GenerationSummary | null) => {
      clientGone.removeEventListener("abort", onGone);
      clearTimeout(timer);
      lease.release();
      freeSlot();
      if (summary) {
        metrics.tokens.inc({}, summary.completionTokens);
        if (summary.finishReason === "cancelled") metrics.cancelled.inc();
        log.set({ completion_tokens: summary.completionTokens, finish_reason: summary.finishReason });
      }
    };
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
      let summary: GenerationSummary | null = null;
      try {
        let r = await run.next();
        while (!r.done) {
          onToken();
          r = await run.next();
        }
        summary = r.value;
        return c.json(chunk(summary.text, finishReason(summary), { usage: usage(summary) }));
      } finally {
        finish(summary);
      }
    }

    log.defer();
    return streamSSE(c, async (stream) => {
      stream.onAbort(() => abort.abort());
      let summary: GenerationSummary | null = null;
      try {
        // After a disconnect the loop keeps pulling: the generator sees the aborted signal at its
        // next step and ends as "cancelled", so nothing is decoded for a client that is gone.
        let r = await run.next();
        while (!r.done) {
          onToken();
          if (!stream.aborted) await stream.writeSSE({ data: JSON.stringify(chunk(r.value.text, null)) });
          r = await run.next();
        }
        summary = r.value;
        if (!stream.aborted) {
          await stream.writeSSE({
            data: JSON.stringify(chunk("", finishReason(summary), { usage: usage(summary) })),
          });
          await stream.writeSSE({ data: "[DONE]" });
        }
      } finally {
        if (!summary) await run.return(undefined as never);
        finish(summary);
        log.emit();
      }
    }, async (err, stream) => {
      console.error(`stream ${id} failed:`, err);
      await stream.writeSSE({
        data: JSON.stringify({ error: { message: err.message, type: "server_error" } }),
      });
    });
  };
}
