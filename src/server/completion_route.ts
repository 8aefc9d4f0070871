import type { Context } from "hono";
import { streamSSE } from "hono/streaming";
import type { z } from "zod";
import { CancelledError, CapacityError, NotFoundError } from "../errors.ts";
import {
  type CompletionContext,
  type CompletionEvent,
  type CompletionJob,
  runCompletion,
} from "../serving/completion.ts";
import type { GenerationSummary } from "../decode/generate.ts";
import type { PromptLogprob, TokenLogprob } from "../sampling/logprobs.ts";
import { ANSWER_SLICE_MS, yieldIfBusy } from "../yield.ts";
import { readBody } from "./body.ts";
import { CLIENT_CLOSED, errorResponse } from "./errors.ts";
import type { AppEnv, RequestLog } from "./logging.ts";
import type { Metrics } from "./metrics.ts";

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

type Started = Extract<CompletionEvent, { type: "started" }>;
type TextEvent = Extract<CompletionEvent, { type: "text" }>;
type Choice = Record<string, unknown>;

/**
 * How one endpoint writes its choices (text completions, chat). Made per request, after the prompt
 * was accepted: it may keep state across chunks (text offsets).
 */
export interface ChoiceWriter {
  /**
   * Streamed, before a choice's first text: chat's role, an echoed prompt. Null for nothing.
   * `prompt`: the logprobs of the choice's prompt, when asked for.
   */
  opening(index: number, prompt: PromptLogprob[] | null): Promise<Choice | null>;
  /**
   * Streamed: a piece of choice `index`'s text and the logprobs of the tokens it came from, as none,
   * one or several deltas (a chat's tool calls are read from the text as it comes).
   */
  piece(index: number, text: string, logprobs: TokenLogprob[] | undefined): Promise<Choice[]>;
  /** Streamed: what a choice held back until its text ended. */
  flush(index: number): Promise<Choice[]>;
  /** Streamed: the end of a choice. */
  end(index: number, finish: string): Choice;
  /** Answered whole (built in slices: a choice may hold thousands of logprob positions). */
  whole(
    index: number,
    text: string,
    logprobs: TokenLogprob[] | null,
    prompt: PromptLogprob[] | null,
    finish: string,
  ): Promise<Choice>;
}

/** What every completion body has, whatever else its endpoint adds. */
interface CommonBody {
  model?: string;
  n: number;
  stream: boolean;
  stream_options?: { include_usage?: boolean } | null;
}

/** What an endpoint contributes: its body schema, the job it asks for, and how it writes choices. */
export interface Endpoint<S extends z.ZodType<CommonBody>> {
  schema: (maxTokensCap: number) => S;
  /** `object` of the whole answer and of each streamed chunk. */
  object: string;
  chunkObject: string;
  idPrefix: string;
  toJob(body: z.infer<S>, limits: CompletionLimits): CompletionJob;
  writer(body: z.infer<S>, started: Started): ChoiceWriter;
}

/**
 * Each prompt counts once however many completions it has (`n`); its cached tokens are its first
 * choice's.
 */
const usage = (all: GenerationSummary[], n: number) => {
  const firsts = all.filter((_, i) => i % n === 0);
  const prompt = firsts.reduce((t, s) => t + s.promptTokens, 0);
  const completion = all.reduce((t, s) => t + s.completionTokens, 0);
  return {
    prompt_tokens: prompt,
    completion_tokens: completion,
    total_tokens: prompt + completion,
    prompt_tokens_details: { cached_tokens: firsts.reduce((t, s) => t + s.cachedTokens, 0) },
  };
};

/** "cancelled" is ours alone (a wall-clock limit here); OpenAI clients only know stop and length. */
const finishReason = (s: GenerationSummary) => (s.finishReason === "cancelled" ? "length" : s.finishReason);

/** The metrics and log line a completion feeds: first-token and inter-token times, tokens, cached prefixes. */
function completionMeter(metrics: Metrics, log: RequestLog, gone: AbortSignal, n: number) {
  const start = performance.now();
  let last = 0;
  let streamed = 0;
  return {
    onToken: () => {
      const now = performance.now();
      if (last === 0) {
        metrics.ttft.observe((now - start) / 1000);
        metrics.live.addTtft((now - start) / 1000);
      } else metrics.interToken.observe((now - last) / 1000);
      last = now;
      // A text event is at least one token; the rest (held-back text, EOS) is counted at the end.
      streamed++;
      metrics.live.addTokens(1);
    },
    finish: (all: GenerationSummary[]) => {
      const used = usage(all, n);
      metrics.live.addTokens(Math.max(0, used.completion_tokens - streamed));
      for (const s of all) {
        metrics.tokens.inc({}, s.completionTokens);
        if (s.cachedTokens > 0) {
          metrics.prefixHits.inc();
          metrics.prefixTokens.inc({}, s.cachedTokens);
        }
      }
      const left = gone.aborted;
      if (left) metrics.cancelled.inc();
      log.set({
        completion_tokens: used.completion_tokens,
        cached_tokens: used.prompt_tokens_details.cached_tokens,
        finish_reason: left ? "cancelled" : finishReason(all[0]),
        ...(left ? { status: CLIENT_CLOSED } : {}),
      });
    },
  };
}

/** A started completion, as both ways of answering it see it. */
interface Answer {
  c: Context<AppEnv>;
  task: AsyncGenerator<CompletionEvent, GenerationSummary[]>;
  writer: ChoiceWriter;
  /** Choices in all (prompts x n); choice i belongs to prompt `promptOf(i)`. */
  choices: number;
  n: number;
  promptOf(index: number): number;
  /** Each prompt's logprobs, once they arrive. */
  promptLogprobs: (PromptLogprob[] | null)[];
  envelope(object: string, choices: Choice[], extra?: Record<string, unknown>): Record<string, unknown>;
  /** Runs the task to its end, handing each text event on. */
  drain(onText: (e: TextEvent) => void | Promise<void>): Promise<GenerationSummary[]>;
  finish(all: GenerationSummary[]): void;
  gone: AbortController;
  log: RequestLog;
}

/** The whole answer as one JSON body, each choice built and serialized with the event loop's turns between. */
async function wholeAnswer(a: Answer, object: string, logprobs: boolean): Promise<Response> {
  const { c, task, writer, choices } = a;
  try {
    const texts = new Array<string>(choices).fill("");
    const lps = Array.from({ length: choices }, () => logprobs ? [] as TokenLogprob[] : null);
    const all = await a.drain((e) => {
      texts[e.index] += e.text;
      if (e.logprobs) lps[e.index]?.push(...e.logprobs);
    });
    a.finish(all);
    if (a.gone.signal.aborted) {
      return errorResponse(c, CLIENT_CLOSED as 400, "client closed request", "cancelled");
    }
    // n=8 answers echoing a long prompt with 20 alternatives a token are megabytes of JSON: each
    // choice is built and encoded as the connection takes it, never the whole body at once.
    const head = JSON.stringify(a.envelope(object, [], { usage: usage(all, a.n) }));
    // The envelope's own `"choices":[]` (quotes inside its string values are escaped).
    const open = head.indexOf(`"choices":[]`) + `"choices":[`.length;
    const encoder = new TextEncoder();
    let next = 0;
    const body = new ReadableStream<Uint8Array>({
      async pull(out) {
        if (next === all.length) {
          out.enqueue(encoder.encode(head.slice(open)));
          return out.close();
        }
        const i = next++;
        const choice = await writer.whole(
          i,
          texts[i],
          lps[i],
          a.promptLogprobs[a.promptOf(i)],
          finishReason(all[i]),
        );
        await yieldIfBusy(ANSWER_SLICE_MS);
        out.enqueue(encoder.encode((i ? "," : head.slice(0, open)) + JSON.stringify(choice)));
      },
    });
    c.header("content-type", "application/json");
    return c.body(body);
  } finally {
    await task.return(undefined as never);
  }
}

/** SSE chunks as the events come: each choice opened once, its pieces, what it held back, the ends, usage. */
function streamAnswer(a: Answer, chunkObject: string, includeUsage: boolean, id: string): Response {
  const { c, task, writer, choices, log } = a;
  log.defer();
  log.set({ status: 200 });
  return streamSSE(c, async (stream) => {
    stream.onAbort(() => a.gone.abort());
    const opened = new Array<boolean>(choices).fill(false);
    const send = async (choices: Choice[], extra?: Record<string, unknown>) => {
      if (!stream.aborted) {
        await stream.writeSSE({ data: JSON.stringify(a.envelope(chunkObject, choices, extra)) });
      }
    };
    const open = async (index: number) => {
      if (opened[index]) return;
      opened[index] = true;
      const choice = await writer.opening(index, a.promptLogprobs[a.promptOf(index)]);
      if (choice) await send([choice]);
    };
    try {
      const all = await a.drain(async (e) => {
        await open(e.index);
        for (const choice of await writer.piece(e.index, e.text, e.logprobs)) await send([choice]);
      });
      a.finish(all);
      for (let i = 0; i < choices; i++) {
        await open(i);
        for (const choice of await writer.flush(i)) await send([choice]);
      }
      await send(all.map((s, i) => writer.end(i, finishReason(s))), { usage: usage(all, a.n) });
      // OpenAI's stream_options.include_usage: one more chunk, no choices, the usage.
      if (includeUsage) await send([], { usage: usage(all, a.n) });
      if (!stream.aborted) await stream.writeSSE({ data: "[DONE]" });
      log.set({ status: a.gone.signal.aborted ? CLIENT_CLOSED : 200 });
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
}

/**
 * POST /v1/completions and /v1/chat/completions: parse the body into a typed job, run it through
 * `runCompletion` (which owns admission, leases, abort, the time limit and every release), and write
 * the events as one JSON answer or as SSE chunks in the endpoint's shape. Until the first event the
 * client's disconnect comes from the request's signal; once streaming, from the stream's.
 */
export function completionRoute<S extends z.ZodType<CommonBody>>(
  endpoint: Endpoint<S>,
  deps: CompletionDeps,
) {
  const schema = endpoint.schema(deps.limits.maxTokensCap);
  const { metrics } = deps;
  return async (c: Context<AppEnv>) => {
    const body = await readBody(c, schema) as z.infer<S>;
    // As OpenAI answers a model it does not serve, and as GET /v1/models/{id} does here.
    if (body.model !== undefined && body.model !== deps.modelName()) {
      throw new NotFoundError(`the model '${body.model.slice(0, 200)}' does not exist`);
    }
    const job = endpoint.toJob(body, deps.limits);
    const { n } = body;
    const log = c.get("log");
    const gone = new AbortController();
    const clientSignal = c.req.raw.signal;
    const onGone = () => gone.abort();
    clientSignal.addEventListener("abort", onGone, { once: true });
    const meter = completionMeter(metrics, log, gone.signal, n);
    const task = runCompletion(job, deps, gone.signal);
    let first: IteratorResult<CompletionEvent>;
    try {
      first = await task.next();
    } catch (e) {
      clientSignal.removeEventListener("abort", onGone);
      if (e instanceof CancelledError) metrics.cancelled.inc();
      if (e instanceof CapacityError) metrics.rejected.inc();
      throw e;
    }
    const started = first.value as Started;
    const id = `${endpoint.idPrefix}-${crypto.randomUUID()}`;
    const created = Math.floor(Date.now() / 1000);
    const model = deps.modelName();
    log.set({
      plan: started.planId,
      prompt_tokens: started.promptTokens.reduce((a, b) => a + b, 0),
      stream: body.stream,
    });
    c.header("x-fusedge-plan", started.planId);
    const promptLogprobs: (PromptLogprob[] | null)[] = started.promptTokens.map(() => null);
    const answer: Answer = {
      c,
      task,
      writer: endpoint.writer(body, started),
      choices: started.promptTokens.length * n,
      n,
      promptOf: (index) => Math.floor(index / n),
      promptLogprobs,
      envelope: (object, choices, extra = {}) => ({
        id,
        object,
        created,
        model,
        plan: started.planId,
        choices,
        ...extra,
      }),
      drain: async (onText) => {
        let r = await task.next();
        while (!r.done) {
          const e = r.value;
          if (e.type === "prompt") promptLogprobs[e.prompt] = e.logprobs;
          else if (e.type === "text") {
            meter.onToken();
            await onText(e);
          }
          r = await task.next();
        }
        return r.value;
      },
      finish: meter.finish,
      gone,
      log,
    };
    if (!body.stream) {
      try {
        return await wholeAnswer(answer, endpoint.object, job.params.logprobs !== undefined);
      } finally {
        clientSignal.removeEventListener("abort", onGone);
      }
    }
    // Once streaming, the stream's own abort tells that the client left.
    clientSignal.removeEventListener("abort", onGone);
    return streamAnswer(answer, endpoint.chunkObject, body.stream_options?.include_usage ?? false, id);
  };
}
