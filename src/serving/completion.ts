import { CancelledError, InputError } from "../errors.ts";
import type { ChatMessage } from "../model/chat_template.ts";
import { type ToolCallFormat, toolCallTag, type ToolRequest } from "../model/tool_calls.ts";
import { asTagFormat, type GrammarSpec } from "../sampling/grammar.ts";
import { checkPromptFits } from "../decode/context.ts";
import type { GenerateParams, GenerationChunk, GenerationSummary } from "../decode/generate.ts";
import type { ModelHost } from "./host.ts";
import type { PromptLogprob, TokenLogprob } from "../sampling/logprobs.ts";
import type { ChatInfo } from "./remote_tokenizer.ts";
import type { Scheduler } from "./scheduler.ts";

/** Text or ids continued as given, or a conversation rendered with the model's chat template. */
export type Prompt = { text: string } | { ids: number[] } | { messages: ChatMessage[] };

/** Choices one request may ask for in all (prompts x n): they decode in one batch. */
export const MAX_CHOICES = 8;

/** A validated completion request, as the runtime takes it. */
export interface CompletionJob {
  /** One or more prompts, each completed n times: choice `p * n + i` is prompt p's i-th. */
  prompts: Prompt[];
  params: GenerateParams;
  /** Completions of each prompt: they share its prefill and decode in one batch. */
  n: number;
  /** Wall-clock limit: the generation ends with what it has (finish "length"). */
  timeoutMs: number;
  /** The prompt's text is wanted back (echo, or logprobs' text offsets). */
  promptText?: boolean;
  /** Functions a conversation offers and how the answer may call them. */
  tools?: ToolRequest;
  /** Who answers: the active plan (the default), or the unfused model beside it. */
  plan?: "active" | "unfused";
}

/** How the answer's calls are read back: the template's format and the names it may call. */
export interface ToolCalls {
  format: ToolCallFormat;
  names: string[];
}

export type CompletionEvent =
  /** `promptTokens` and `promptTexts` per prompt. */
  | {
    type: "started";
    planId: string;
    promptTokens: number[];
    promptTexts?: string[];
    /** Present when the answer may hold tool calls. */
    toolCalls?: ToolCalls;
  }
  /** Once a prompt, before its text, when its logprobs were asked for (its first choice's). */
  | { type: "prompt"; prompt: number; logprobs: PromptLogprob[] }
  | { type: "text"; index: number; text: string; logprobs?: TokenLogprob[] };

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

/** The served model's chat template (its end of turn); a model without one is bad input naming `messages`. */
export function requireChat(host: ModelHost): ChatInfo {
  const chat = host.tokenizer!.chat;
  if (!chat) {
    throw new InputError(
      `model ${host.name} has no chat template (no chat_template in its tokenizer_config.json); ` +
        "start the server with --chat-template FILE",
      "messages",
    );
  }
  return chat;
}

/** The characters a prompt's text comes to before tokenisation (none for token ids). */
export function promptChars(prompt: Prompt): number {
  if ("text" in prompt) return prompt.text.length;
  if ("messages" in prompt) {
    return prompt.messages.reduce(
      (n, m) => n + m.content.length + JSON.stringify(m.tool_calls ?? []).length,
      0,
    );
  }
  return 0;
}

/**
 * The grammar an answer follows: the request's own, or, where it may call tools, the calls' tag
 * (with the request's grammar as the alternative to calling under `auto`).
 */
function answerGrammar(job: CompletionJob, tools: ToolCalls | undefined): GrammarSpec | undefined {
  const own = job.params.grammar;
  if (!tools || !job.tools) return own;
  const tag = toolCallTag(tools.format, job.tools, own && asTagFormat(own));
  return tag ? { field: "tools", type: "structural_tag", tag: JSON.stringify(tag) } : own;
}

/**
 * One completion's whole life in one scope: bound the prompt, wait for admission, tokenise (in the
 * tokenizer worker), reserve the KV cache each of its n choices can grow to, lease the active plan, generate with the caller's abort and the wall-clock
 * limit wired to one signal, and release everything in one `finally`, however it ends. The first
 * event is `started` (admitted, prompt accepted); errors before it are the caller's to report.
 * A caller that stops consuming early (`return()`) cancels the generation.
 */
export async function* runCompletion(
  job: CompletionJob,
  ctx: CompletionContext,
  signal: AbortSignal,
): AsyncGenerator<CompletionEvent, GenerationSummary[]> {
  const { host, scheduler } = ctx;
  const config = host.requireReady(); // before queueing: a model still loading answers at once
  const { prompts, n } = job;
  const field = "messages" in prompts[0] ? "messages" : "prompt";
  const chat = "messages" in prompts[0] ? requireChat(host) : null;
  if (prompts.length * n > MAX_CHOICES) {
    throw new InputError(
      `${prompts.length} prompts x n=${n} is ${prompts.length * n} choices; at most ${MAX_CHOICES} a request`,
      "n",
    );
  }
  for (const prompt of prompts) {
    const chars = promptChars(prompt);
    if (chars > maxPromptChars(host)) {
      throw new InputError(
        `${chars} characters cannot fit the context of ${config.maxPositions} tokens ` +
          `(at most ${maxPromptChars(host)} characters for this tokenizer)`,
        field,
      );
    }
  }
  const abort = new AbortController();
  const onAbort = () => abort.abort();
  signal.addEventListener("abort", onAbort, { once: true });
  let free: (() => void) | null = null;
  const kvFree: (() => void)[] = [];
  let lease: ReturnType<ModelHost["lease"]> | null = null;
  let timer: ReturnType<typeof setTimeout> | undefined;
  let runs: AsyncGenerator<GenerationChunk, GenerationSummary>[] = [];
  try {
    free = await scheduler.acquire(abort.signal);
    const idsOf: number[][] = [];
    for (const prompt of prompts) {
      const ids = "ids" in prompt
        ? prompt.ids
        : "text" in prompt
        ? await host.tokenizer!.encode(prompt.text)
        : await host.tokenizer!.encodeChat(prompt.messages, job.tools?.functions);
      if (signal.aborted) throw new CancelledError("request was cancelled before it started");
      const bad = ids.find((id) => id >= config.vocabSize);
      if (bad !== undefined) {
        throw new InputError(
          `token id ${bad} is out of range (vocabulary size ${config.vocabSize})`,
          "prompt",
        );
      }
      checkPromptFits(ids.length, config.maxPositions, field);
      idsOf.push(ids);
    }
    const promptTexts = !job.promptText || chat ? undefined : await Promise.all(
      prompts.map((p) => "text" in p ? p.text : host.tokenizer!.decode((p as { ids: number[] }).ids)),
    );
    for (const ids of idsOf) {
      for (let i = 0; i < n; i++) {
        kvFree.push(
          await scheduler.reserveKv(
            Math.min(ids.length + job.params.maxTokens, config.maxPositions),
            abort.signal,
            { tokens: ids.length, field },
          ),
        );
      }
    }
    const toolCalls = chat && job.tools && job.tools.choice !== "none"
      ? { format: chat.toolFormat, names: job.tools.functions.map((f) => f.name) }
      : undefined;
    const grammar = answerGrammar(job, toolCalls);
    lease = job.plan === "unfused" ? await host.leaseUnfused() : host.lease();
    // A grammar is compiled where the model runs, before the answer starts: a bad one is a 400.
    if (grammar) await lease.instance.checkGrammar(grammar);
    timer = setTimeout(onAbort, job.timeoutMs);
    yield {
      type: "started",
      planId: lease.instance.planId,
      promptTokens: idsOf.map((ids) => ids.length),
      promptTexts,
      toolCalls,
    };
    // A chat ends at the template's end-of-turn marker as well as at EOS.
    const params = !chat ? job.params : {
      ...job.params,
      grammar,
      stopTokenIds: chat.endOfTurnIds,
      stop: chat.endOfTurnStop ? [...job.params.stop, chat.endOfTurnStop] : job.params.stop,
    };
    // Each choice of a prompt samples its own stream: seed, seed + 1, ... when the request fixes one
    // (as n separate requests would). A prompt's logprobs are the same for all its choices: the
    // first computes them, the others reuse its prefix.
    const seeded = (i: number) => ({
      ...params,
      ...(params.seed === undefined ? {} : { seed: (params.seed + i) % 2 ** 32 }),
      promptLogprobs: i === 0 && params.promptLogprobs,
    });
    runs = idsOf.flatMap((ids) =>
      Array.from({ length: n }, (_, i) => lease!.instance.generate(ids, seeded(i), abort.signal))
    );
    const summaries: GenerationSummary[] = new Array(runs.length);
    const pending = new Map<
      number,
      Promise<{ i: number; r: IteratorResult<GenerationChunk, GenerationSummary> }>
    >();
    const pull = (i: number) => {
      const next = runs[i].next().then((r) => ({ i, r }));
      next.catch(() => {}); // raced below; once one fails, the others' ends are not awaited
      pending.set(i, next);
    };
    runs.forEach((_, i) => pull(i));
    while (pending.size) {
      const { i, r } = await Promise.race(pending.values());
      if (r.done) {
        summaries[i] = r.value;
        pending.delete(i);
      } else {
        const c = r.value;
        if (c.promptLogprobs) yield { type: "prompt", prompt: Math.floor(i / n), logprobs: c.promptLogprobs };
        if (c.text || c.logprobs) yield { type: "text", index: i, text: c.text, logprobs: c.logprobs };
        pull(i);
      }
    }
    return summaries;
  } finally {
    abort.abort(); // a no-op after a finished run; stops the worker's decoding otherwise
    for (const run of runs) await run.return(undefined as never);
    clearTimeout(timer);
    signal.removeEventListener("abort", onAbort);
    lease?.release();
    for (const f of kvFree) f();
    free?.();
  }
}
