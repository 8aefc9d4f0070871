import { CancelledError, InputError } from "../errors.ts";
import { checkPromptFits } from "./context.ts";
import type { GenerateParams, GenerationSummary } from "./generate.ts";
import type { ModelHost } from "./host.ts";
import type { Scheduler } from "./scheduler.ts";

/** A validated completion request, as the runtime takes it. */
export interface CompletionJob {
  prompt: { text: string } | { ids: number[] };
  params: GenerateParams;
  /** Wall-clock limit: the generation ends with what it has (finish "length"). */
  timeoutMs: number;
}

export type CompletionEvent =
  | { type: "started"; planId: string; promptTokens: number }
  | { type: "text"; text: string };

export interface CompletionContext {
  host: ModelHost;
  scheduler: Scheduler;
}

/**
 * A prompt longer than this cannot fit the context whatever it encodes to, so it is refused before
 * any tokenisation work: the bound is the context times the longest text one token stands for.
 */
export function maxPromptChars(host: ModelHost): number {
  return host.config!.maxPositions * host.tokenizer!.maxTokenChars;
}

/**
 * One completion's whole life in one scope: bound the prompt, wait for admission, tokenise (in the
 * tokenizer worker), reserve the KV cache it can grow to, lease the active plan, generate with the caller's abort and the wall-clock
 * limit wired to one signal, and release everything in one `finally`, however it ends. The first
 * event is `started` (admitted, prompt accepted); errors before it are the caller's to report.
 * A caller that stops consuming early (`return()`) cancels the generation.
 */
export async function* runCompletion(
  job: CompletionJob,
  ctx: CompletionContext,
  signal: AbortSignal,
): AsyncGenerator<CompletionEvent, GenerationSummary> {
  const { host, scheduler } = ctx;
  const config = host.requireReady(); // before queueing: a model still loading answers at once
  if ("text" in job.prompt && job.prompt.text.length > maxPromptChars(host)) {
    throw new InputError(
      `${job.prompt.text.length} characters cannot fit the context of ${config.maxPositions} tokens ` +
        `(at most ${maxPromptChars(host)} characters for this tokenizer)`,
      "prompt",
    );
  }
  const abort = new AbortController();
  const onAbort = () => abort.abort();
  signal.addEventListener("abort", onAbort, { once: true });
  let free: (() => void) | null = null;
  let kvFree: (() => void) | null = null;
  let lease: ReturnType<ModelHost["lease"]> | null = null;
  let timer: ReturnType<typeof setTimeout> | undefined;
  let run: AsyncGenerator<unknown, GenerationSummary> | null = null;
  try {
    free = await scheduler.acquire(abort.signal);
    const ids = "ids" in job.prompt ? job.prompt.ids : await host.tokenizer!.encode(job.prompt.text);
    if (signal.aborted) throw new CancelledError("request was cancelled before it started");
    const bad = ids.find((id) => id >= config.vocabSize);
    if (bad !== undefined) {
      throw new InputError(`token id ${bad} is out of range (vocabulary size ${config.vocabSize})`, "prompt");
    }
    checkPromptFits(ids.length, config.maxPositions);
    kvFree = await scheduler.reserveKv(
      Math.min(ids.length + job.params.maxTokens, config.maxPositions),
      abort.signal,
    );
    lease = host.lease();
    timer = setTimeout(onAbort, job.timeoutMs);
    yield { type: "started", planId: lease.instance.planId, promptTokens: ids.length };
    const gen = lease.instance.generate(ids, job.params, abort.signal);
    run = gen;
    let r = await gen.next();
    while (!r.done) {
      yield { type: "text", text: r.value.text };
      r = await gen.next();
    }
    return r.value;
  } finally {
    abort.abort(); // a no-op after a finished run; stops the worker's decoding otherwise
    await run?.return(undefined as never);
    clearTimeout(timer);
    signal.removeEventListener("abort", onAbort);
    lease?.release();
    kvFree?.();
    free?.();
  }
}
