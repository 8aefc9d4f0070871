import type { Context } from "hono";
import { streamSSE } from "hono/streaming";
import { z } from "zod";
import { generationFields, toGenerateParams } from "../api/generation.ts";
import { CancelledError, CapacityError } from "../errors.ts";
import { type CompletionContext, type CompletionJob, runCompletion } from "../runtime/completion.ts";
import type { GenerationSummary } from "../runtime/generate.ts";
import { CLIENT_CLOSED, errorResponse, readBody } from "./errors.ts";
import type { AppEnv } from "./logging.ts";
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
    n: z.number().int().min(1).max(8).default(1),
    echo: z.literal(false, "echo is not supported").optional(),
    logprobs: z.null("logprobs are not supported").optional(),
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

export interface CompletionDeps extends CompletionContext {
  metrics: Metrics;
  limits: CompletionLimits;
  modelName: () => string;
}

function toJob(body: CompletionRequest, limits: CompletionLimits): CompletionJob {
  const p = body.prompt;
  const prompt = typeof p === "string"
    ? { text: p }
    : typeof p[0] === "string"
    ? { text: p[0] as string }
    : { ids: p as number[] };
  return { prompt, params: toGenerateParams(body), n: body.n, timeoutMs: limits.requestTimeoutMs };
}

/** One prompt, n completions: the prompt counts once; its cached tokens are the first choice's. */
const usage = (all: GenerationSummary[]) => {
  const completion = all.reduce((n, s) => n + s.completionTokens, 0);
  return {
    prompt_tokens: all[0].promptTokens,
    completion_tokens: completion,
    total_tokens: all[0].promptTokens + completion,
    prompt_tokens_details: { cached_tokens: all[0].cachedTokens },
  };
};

/** "cancelled" is ours alone (a wall-clock limit here); OpenAI clients only know stop and length. */
const finishReason = (s: GenerationSummary) => (s.finishReason === "cancelled" ? "length" : s.finishReason);

/**
 * POST /v1/completions: parse the body into a typed job, run it through `runCompletion` (which owns
 * admission, leases, abort, the time limit and every release), and render the events as one JSON
 * answer or as SSE chunks. Until the first event the client's disconnect comes from the request's
 * signal; once streaming, from the stream's.
 */
export function completionsHandler(deps: CompletionDeps) {
  const schema = completionSchema(deps.limits.maxTokensCap);
  const { metrics } = deps;
  return async (c: Context<AppEnv>) => {
    const body = await readBody(c, schema);
    const job = toJob(body, deps.limits);
    const log = c.get("log");
    const gone = new AbortController();
    const clientSignal = c.req.raw.signal;
    const onGone = () => gone.abort();
    clientSignal.addEventListener("abort", onGone, { once: true });
    const start = performance.now();
    let last = 0;
    const onToken = () => {
      const now = performance.now();
      if (last === 0) metrics.ttft.observe((now - start) / 1000);
      else metrics.interToken.observe((now - last) / 1000);
      last = now;
    };
    const finish = (all: GenerationSummary[]) => {
      for (const s of all) {
        metrics.tokens.inc({}, s.completionTokens);
        if (s.cachedTokens > 0) {
          metrics.prefixHits.inc();
          metrics.prefixTokens.inc({}, s.cachedTokens);
        }
      }
      const left = gone.signal.aborted;
      if (left) metrics.cancelled.inc();
      log.set({
        completion_tokens: usage(all).completion_tokens,
        cached_tokens: all[0].cachedTokens,
        finish_reason: left ? "cancelled" : finishReason(all[0]),
        ...(left ? { status: CLIENT_CLOSED } : {}),
      });
    };
    const task = runCompletion(job, deps, gone.signal);
    let first: IteratorResult<unknown>;
    try {
      first = await task.next();
    } catch (e) {
      clientSignal.removeEventListener("abort", onGone);
      if (e instanceof CancelledError) metrics.cancelled.inc();
      if (e instanceof CapacityError) metrics.rejected.inc();
      throw e;
    }
    const started = first.value as { planId: string; promptTokens: number };
    const id = `cmpl-${crypto.randomUUID()}`;
    const created = Math.floor(Date.now() / 1000);
    const model = deps.modelName();
    log.set({ plan: started.planId, prompt_tokens: started.promptTokens, stream: body.stream });
    c.header("x-fusedge-plan", started.planId);
    type Choice = { text: string; index: number; logprobs: null; finish_reason: string | null };
    const choice = (index: number, text: string, finish: string | null): Choice => ({
      text,
      index,
      logprobs: null,
      finish_reason: finish,
    });
    const chunk = (choices: Choice[], extra: Record<string, unknown> = {}) => ({
      id,
      object: "text_completion",
      created,
      model,
      plan: started.planId,
      choices,
      ...extra,
    });

    if (!body.stream) {
      try {
        const texts = new Array<string>(body.n).fill("");
        let r = await task.next();
        while (!r.done) {
          onToken();
          const e = r.value as { index: number; text: string };
          texts[e.index] += e.text;
          r = await task.next();
        }
        const all = r.value;
        finish(all);
        if (gone.signal.aborted) {
          return errorResponse(c, CLIENT_CLOSED as 400, "client closed request", "cancelled");
        }
        return c.json(chunk(all.map((s, i) => choice(i, texts[i], finishReason(s))), { usage: usage(all) }));
      } finally {
        clientSignal.removeEventListener("abort", onGone);
        await task.return(undefined as never);
      }
    }

    clientSignal.removeEventListener("abort", onGone);
    log.defer();
    log.set({ status: 200 });
    return streamSSE(c, async (stream) => {
      stream.onAbort(onGone);
      try {
        let r = await task.next();
        while (!r.done) {
          onToken();
          const e = r.value as { index: number; text: string };
          if (!stream.aborted) {
            await stream.writeSSE({ data: JSON.stringify(chunk([choice(e.index, e.text, null)])) });
          }
          r = await task.next();
        }
        const all = r.value;
        finish(all);
        if (!stream.aborted) {
          await stream.writeSSE({
            data: JSON.stringify(
              chunk(all.map((s, i) => choice(i, "", finishReason(s))), { usage: usage(all) }),
            ),
          });
          // OpenAI's stream_options.include_usage: one more chunk, no choices, the usage.
          if (body.stream_options?.include_usage) {
            await stream.writeSSE({ data: JSON.stringify(chunk([], { usage: usage(all) })) });
          }
          await stream.writeSSE({ data: "[DONE]" });
        }
        log.set({ status: gone.signal.aborted ? CLIENT_CLOSED : 200 });
      } finally {
        await task.return(undefined as never);
        log.emit();
      }
    }, async (err, stream) => {
      console.error(`stream ${id} failed:`, err);
      log.set({ status: 500, error: err.message });
      await stream.writeSSE({
        data: JSON.stringify({ error: { message: err.message, type: "server_error" } }),
      });
    });
  };
}
