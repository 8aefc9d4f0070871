import type { HealReport } from "../fusion/heal.ts";
import { BusyError } from "../errors.ts";
import type { FusionPlan } from "../fusion/plan.ts";
import type { Checkpoint } from "../model/checkpoint.ts";
import type { GraphOptions } from "../onnx/format.ts";
import type { WeightEntries } from "../onnx/weight_cache.ts";
import {
  generate,
  type GenerateParams,
  type GenerationChunk,
  type GenerationSummary,
  type SequenceHandlers,
  type SequenceSink,
} from "../decode/generate.ts";
import type { BuildSpec, InstanceReply, InstanceRequest, KvSlots } from "./protocol.ts";

export type { BuildSpec };
import type { Device } from "../ort/ort.ts";
import type { PromptLogprob } from "../sampling/logprobs.ts";
import type { GrammarSpec } from "../sampling/grammar.ts";
import { fromWorkerError } from "../workers/worker_error.ts";
import { ConvertHelpers } from "../onnx/convert_pool.ts";
import { waitAtMost } from "../yield.ts";

/** What a build converted and reused, and the converted weights it leaves for later builds. */
export interface BuildWeights {
  rebuiltBytes: number;
  reusedBytes: number;
  added: WeightEntries;
  /** Every weight the instance's graph uses: the keeper frees entries no live instance uses. */
  keys: string[];
}

/** A runnable model under one plan, as the serving thread sees it. */
export interface PlanInstance {
  readonly plan: FusionPlan;
  readonly planId: string;
  readonly device: Device;
  /** FFN MatMul triples in the graph: one per unfused FFN, one per fused group. */
  readonly ffnBlocks: number;
  readonly buildMs: number;
  readonly graph: GraphOptions;
  readonly weightBytes: number;
  /** KV bytes one token of one sequence takes under this plan, and the bytes its sequences hold now. */
  readonly kvBytesPerToken: number;
  readonly kvBytes: number;
  /** WebGPU's static KV cache: sequences that decode at once and the tokens each can hold; absent elsewhere. */
  readonly slots?: KvSlots;
  /** What healing did, when the plan asks for it. */
  readonly heal?: HealReport;
  generate(promptIds: number[], params: GenerateParams, signal: AbortSignal): AsyncGenerator<
    GenerationChunk,
    GenerationSummary
  >;
  /** Compiles a grammar where the model runs (a bad one is bad input naming its field). */
  checkGrammar(spec: GrammarSpec): Promise<void>;
  close(): Promise<void>;
}

export interface BuiltInstance {
  instance: PlanInstance;
  checkpoint: Checkpoint | null;
  weights: BuildWeights;
  /** Of the build, the time onnxruntime took to create the session. */
  sessionMs: number;
}

/** A build in progress: `cancel` ends its worker at once, wherever the build is. */
export interface PendingBuild {
  ready: Promise<BuiltInstance>;
  cancel(reason: string): void;
  /** Where a long build is (healing reports its stages), null until it says. */
  readonly progress?: BuildProgress | null;
}

export interface BuildProgress {
  stage: string;
  done: number;
  total: number;
}

/**
 * The serving thread's handle on one plan's worker (see instance_worker.ts): generations are
 * messages in and out, so nothing about building or decoding runs on the serving thread.
 */
export class RemoteInstance implements PlanInstance, SequenceSink {
  private readonly streams = new Map<number, SequenceHandlers>();
  /** Grammar checks use ids below zero, apart from the sequences' (see checkGrammar). */
  private nextCheck = -1;
  /** A long prompt's logprobs as their parts arrive, until the chunk with the rest. */
  private readonly promptParts = new Map<number, PromptLogprob[][]>();
  private dead: string | null = null;
  kvBytes = 0;

  private constructor(
    private readonly worker: Worker,
    readonly plan: FusionPlan,
    readonly planId: string,
    readonly device: Device,
    readonly ffnBlocks: number,
    readonly buildMs: number,
    readonly graph: GraphOptions,
    readonly weightBytes: number,
    readonly kvBytesPerToken: number,
    readonly heal?: HealReport,
    readonly slots?: KvSlots,
  ) {
    worker.onmessage = (e: MessageEvent<InstanceReply>) => {
      const m = e.data;
      if (m.type === "kv") this.kvBytes = m.bytes;
      else if ("id" in m) this.reply(m);
    };
    worker.onerror = (e) => {
      e.preventDefault();
      this.fail(`model worker crashed: ${e.message}`);
    };
  }

  static build(spec: BuildSpec): PendingBuild {
    const worker = new Worker(new URL("../workers/instance_worker.ts", import.meta.url).href, {
      type: "module",
    });
    let settle: { reject: (e: Error) => void } | null = null;
    let progress: BuildProgress | null = null;
    const ready = new Promise<BuiltInstance>(
      (resolve, reject) => {
        settle = { reject };
        worker.onmessage = (e: MessageEvent<InstanceReply>) => {
          const m = e.data;
          if (m.type === "progress") {
            progress = { stage: m.stage, done: m.done, total: m.total };
            return;
          }
          if (m.type === "built") {
            settle = null;
            const instance = new RemoteInstance(
              worker,
              spec.plan,
              m.planId,
              spec.device,
              m.ffnBlocks,
              m.buildMs,
              spec.graph,
              m.weightBytes,
              m.kvBytesPerToken,
              m.heal,
              m.slots,
            );
            resolve({
              instance,
              checkpoint: m.checkpoint,
              sessionMs: m.sessionMs,
              weights: {
                rebuiltBytes: m.rebuiltBytes,
                reusedBytes: m.reusedBytes,
                added: m.addedWeights,
                keys: m.weightKeys,
              },
            });
          } else if (m.type === "failed") {
            settle = null;
            worker.terminate();
            reject(fromWorkerError(m, `building ${spec.planId} failed`));
          }
        };
        worker.onerror = (e) => {
          e.preventDefault();
          settle = null;
          worker.terminate();
          reject(new Error(`building ${spec.planId} failed: ${e.message}`));
        };
      },
    );
    // The helpers are this thread's: a terminated instance worker would leave workers of its own running.
    const helpers = (spec.convertThreads ?? 1) > 1 ? ConvertHelpers.start(spec.convertThreads!) : null;
    const endHelpers = () => helpers?.then((h) => h.close(), () => {});
    const { planId: _, ...build } = spec;
    (helpers ?? Promise.resolve(null)).then(
      (h) => worker.postMessage({ type: "build", ...build, convert: h?.buffers } satisfies InstanceRequest),
      // Without helpers the build converts in its own thread.
      () => worker.postMessage({ type: "build", ...build } satisfies InstanceRequest),
    );
    // Built, failed or cancelled: the helpers' part is over either way.
    ready.then(endHelpers, endHelpers);
    return {
      ready,
      get progress() {
        return progress;
      },
      cancel: (reason) => {
        if (!settle) return;
        worker.terminate();
        settle.reject(new BusyError(reason));
        settle = null;
      },
    };
  }

  /** Streams one generation; aborting `signal` stops it at its next decode step. */
  generate(
    promptIds: number[],
    params: GenerateParams,
    signal: AbortSignal,
  ): AsyncGenerator<GenerationChunk, GenerationSummary> {
    return generate({ engine: this, promptIds, params, signal });
  }

  /** The worker's engine, seen from here: a sequence in, its handlers called as the replies come. */
  submit(id: number, promptIds: number[], params: GenerateParams, handlers: SequenceHandlers): void {
    if (this.dead) return handlers.failed(new Error(this.dead));
    this.streams.set(id, handlers);
    this.send({ type: "generate", id, promptIds, params });
  }

  cancel(id: number): void {
    if (this.streams.has(id)) this.send({ type: "cancel", id });
  }

  checkGrammar(spec: GrammarSpec): Promise<void> {
    if (this.dead) return Promise.reject(new Error(this.dead));
    const id = this.nextCheck--;
    return new Promise<void>((resolve, reject) => {
      this.streams.set(id, { chunk: () => {}, done: () => resolve(), failed: reject });
      this.send({ type: "grammar", id, spec });
    });
  }

  /** Hands a worker's reply about one sequence to its handlers; the last one lets them go. */
  private reply(m: Extract<InstanceReply, { id: number | null }>): void {
    const h = m.id === null ? undefined : this.streams.get(m.id);
    if (!h) return;
    if (m.type === "promptPart") {
      const parts = this.promptParts.get(m.id) ?? [];
      parts.push(m.logprobs);
      return void this.promptParts.set(m.id, parts);
    }
    if (m.type === "chunk") {
      const parts = this.promptParts.get(m.id);
      if (!parts) return h.chunk(m.chunk);
      this.promptParts.delete(m.id);
      return h.chunk({ ...m.chunk, promptLogprobs: [...parts.flat(), ...m.chunk.promptLogprobs ?? []] });
    }
    this.promptParts.delete(m.id!);
    this.streams.delete(m.id!);
    if (m.type === "done") h.done(m.summary);
    else if (m.type === "failed") h.failed(fromWorkerError(m));
  }

  private send(m: InstanceRequest): void {
    if (!this.dead) this.worker.postMessage(m);
  }

  private fail(message: string): void {
    this.dead = message;
    for (const h of this.streams.values()) h.failed(new Error(message));
    this.streams.clear();
    this.promptParts.clear();
    this.worker.terminate();
  }

  /** Releases the session (GPU buffers included), then ends the worker and all of its memory. */
  async close(): Promise<void> {
    if (this.dead) return;
    const closed = new Promise<void>((resolve) => {
      const prev = this.worker.onmessage;
      this.worker.onmessage = (e: MessageEvent<InstanceReply>) => {
        if (e.data.type === "closed") resolve();
        else prev?.call(this.worker, e);
      };
    });
    this.send({ type: "close" });
    await waitAtMost(closed, 5000);
    this.dead = "instance was closed";
    this.worker.terminate();
  }
}
