/**
 * The messages between the serving thread's handle on a plan instance (remote_instance.ts) and the
 * instance's worker (src/workers/instance_worker.ts).
 */
import type { HealReport } from "../fusion/heal.ts";
import type { FusionPlan } from "../fusion/plan.ts";
import type { Checkpoint } from "../model/checkpoint.ts";
import type { GraphOptions } from "../onnx/format.ts";
import type { WeightEntries } from "../onnx/weight_cache.ts";
import type { GenerateParams, GenerationChunk, GenerationSummary } from "../decode/generate.ts";
import type { PromptLogprob } from "../sampling/logprobs.ts";
import type { GrammarSpec } from "../sampling/grammar.ts";
import type { Device } from "../ort/ort.ts";
import type { WorkerError } from "../workers/worker_error.ts";
import type { HelperBuffers } from "../onnx/convert_pool.ts";

/** A static KV cache's shape (WebGPU): `count` sequences at once, `tokens` each. */
export interface KvSlots {
  count: number;
  tokens: number;
}

/** What a plan instance is built from. */
export interface BuildSpec {
  modelDir: string;
  /** The checkpoint already loaded (file-backed); null makes the worker load it and hand it back. */
  checkpoint: Checkpoint | null;
  plan: FusionPlan;
  planId: string;
  device: Device;
  graph: GraphOptions;
  /** With `checkpoint` null: the context cap applied while loading it. */
  maxContext?: number;
  /** Converted weights of earlier builds, reused where this plan has the same groups. */
  weights: WeightEntries;
  /** Where the weights this build converts are written (a WeightStore's directory). */
  weightDir: string;
  /** Text a plan's linear attentions are fitted on. */
  calibrationText?: string;
  /** KV bytes the instance's sequences and its kept prefixes may hold (0: keep no prefix). */
  kvBudgetBytes?: number;
  /** What the kept prefixes may hold of it, on the host (EngineOptions.prefixCacheBytes). */
  prefixCacheBytes?: number;
  /** onnxruntime's threads for this instance's session (the device's default when absent). */
  threads?: number;
  /** Sequences decoding at once (EngineOptions.slots). */
  slots?: number;
  /** Threads that quantize the build's weights (onnx/convert_pool.ts; 1 or absent: the build's own). */
  convertThreads?: number;
}

export type InstanceRequest =
  /** The instance to build: all of its spec but its id, which the worker computes. */
  | ({ type: "build"; convert?: HelperBuffers[] } & Omit<BuildSpec, "planId">)
  | { type: "generate"; id: number; promptIds: number[]; params: GenerateParams }
  | { type: "cancel"; id: number }
  /** Compile a grammar: answered `done` (compiled) or `failed`, under this id. */
  | { type: "grammar"; id: number; spec: GrammarSpec }
  | { type: "close" };

export type InstanceReply =
  | {
    type: "built";
    buildMs: number;
    sessionMs: number;
    ffnBlocks: number;
    planId: string;
    weightBytes: number;
    rebuiltBytes: number;
    reusedBytes: number;
    /** The weights this build converted, for later builds, and every weight key its graph uses. */
    addedWeights: WeightEntries;
    weightKeys: string[];
    checkpoint: Checkpoint | null;
    /** KV cache bytes one token of one sequence takes under this plan (removed attention has none). */
    kvBytesPerToken: number;
    /** WebGPU's slots: how many sequences decode at once, and the tokens each can hold. */
    slots?: KvSlots;
    heal?: HealReport;
  }
  /** KV bytes the instance holds now, after each change. */
  | { type: "kv"; bytes: number }
  /** A long build's stage (healing): the serving thread shows it in GET /fuse. */
  | { type: "progress"; stage: string; done: number; total: number }
  /** The first positions of a long prompt's logprobs, ahead of the chunk that carries the rest. */
  | { type: "promptPart"; id: number; logprobs: PromptLogprob[] }
  | { type: "chunk"; id: number; chunk: GenerationChunk }
  | { type: "done"; id: number; summary: GenerationSummary }
  | { type: "failed"; id: number | null } & WorkerError
  | { type: "closed" };
