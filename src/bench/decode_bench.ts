import type { GrammarSpec } from "../sampling/grammar.ts";
import process from "node:process";
import type { FusionPlan } from "../fusion/plan.ts";
import { FLOAT_WEIGHTS, type GraphOptions } from "../onnx/format.ts";
import type { WeightCache } from "../onnx/weight_cache.ts";
import { type Spread, spread } from "../numeric.ts";
import { buildInstance, type ModelAssets, type ModelInstance } from "../instance/build.ts";
import { generate } from "../decode/generate.ts";
import { type Backend, isNative } from "../ort/ort.ts";
import { DEFAULT_SAMPLING } from "../sampling/sampling.ts";
import { asBatch, type ModelSession } from "../ort/session.ts";
import { inRounds } from "./rounds.ts";

export interface DecodeCase {
  /**
   * `native` is onnxruntime-node on the CPU running the identical graph, the reference for WASM;
   * `native-webgpu` its WebGPU provider (Dawn), the reference for Deno's WebGPU, decoding as WASM does
   * (caches and logits through host memory: the node binding keeps no output on the GPU).
   */
  device: Backend;
  plan: string;
  /** Where tokens were chosen: on the GPU with batched readback (WebGPU), or on the host. */
  sampling: "gpu" | "host";
  tokens: number;
  rounds: number;
  /** Prompt prefill, ms per round. */
  prefill_ms: Spread;
  /** Decode after the first token, tokens per wall-clock second per round. */
  tokens_per_second: Spread;
  /** Decode tokens per second of this process's CPU time (WASM: the work itself, not the machine's load). */
  tokens_per_cpu_second: Spread | null;
  /** This plan's median decode rate over the first plan's on the same device (1 for the first). */
  speedup: number;
}

export interface DecodeBench {
  cases: DecodeCase[];
  /** Devices that could not run here, with the reason (e.g. no native onnxruntime binary). */
  skipped: { device: Backend; reason: string }[];
}

/** The prompt every decode measurement starts from. */
export const BENCH_PROMPT = "import os\nimport sys\n\ndef main(";

export interface Sample {
  prefillMs: number;
  tokensPerSecond: number;
  tokensPerCpuSecond: number;
}

/** Greedy generation of exactly `tokens` tokens (in every row), prefill included, driven to its end. */
export type GenerateTokens = (tokens: number) => Promise<void>;

/** CPU seconds of this whole process so far (every worker included). */
export const cpuSeconds = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
};

/**
 * Wall and CPU milliseconds a step of `batch` rows takes, each row continuing the first `length` ids
 * (prefilled once, untimed) and fed `ids[length]`, over `steps` batched steps.
 */
export async function batchStepTimes(
  s: ModelSession,
  ids: number[],
  length: number,
  batch: number,
  steps: number,
): Promise<{ ms: number; cpuMs: number }> {
  const prefix = (await s.step(ids.slice(0, length), s.emptyCache(), "last")).cache;
  let cache = await s.packRows(
    Array.from({ length: batch }, () => ({ cache: asBatch(prefix), row: 0 })),
    length + steps + 1,
  );
  const next = new Array<number>(batch).fill(ids[length]);
  const cpu0 = cpuSeconds();
  const t0 = performance.now();
  for (let k = 0; k < steps; k++) cache = (await s.decodeBatch(next, cache)).cache;
  return { ms: (performance.now() - t0) / steps, cpuMs: ((cpuSeconds() - cpu0) * 1000) / steps };
}

/** Wall and CPU time (the whole process's: workers included) of one generation. */
async function timeGeneration(generateTokens: GenerateTokens, tokens: number) {
  const cpu0 = cpuSeconds();
  const t0 = performance.now();
  await generateTokens(tokens);
  return { ms: performance.now() - t0, cpu: cpuSeconds() - cpu0 };
}

/**
 * One round for one plan: a 1-token generation (the prefill) and a `tokens`-token one, in `rows`
 * sequences at once; the decode rate is the difference. Timing whole generations keeps the GPU
 * engine honest: it hands tokens over in batches, so the time of the first one to arrive is not the
 * prefill's.
 */
export async function decodePass(generateTokens: GenerateTokens, tokens: number, rows = 1): Promise<Sample> {
  const one = await timeGeneration(generateTokens, 1);
  const all = await timeGeneration(generateTokens, tokens);
  const decoded = rows * (tokens - 1);
  return {
    prefillMs: one.ms,
    tokensPerSecond: decoded / (Math.max(all.ms - one.ms, 1e-3) / 1000),
    tokensPerCpuSecond: decoded / Math.max(all.cpu - one.cpu, 1e-6),
  };
}

/** An in-process instance's generation of `rows` sequences at once from one prompt, for decodePass. */
export function generator(
  inst: ModelInstance,
  promptIds: number[],
  rows = 1,
  grammar?: GrammarSpec,
): GenerateTokens {
  const one = async (tokens: number) => {
    const run = generate({
      engine: inst.engine,
      promptIds,
      params: { ...DEFAULT_SAMPLING, maxTokens: tokens, stop: [], ignoreEos: true, grammar },
    });
    let r = await run.next();
    while (!r.done) r = await run.next();
  };
  return async (tokens) => {
    await Promise.all(Array.from({ length: rows }, () => one(tokens)));
  };
}

/**
 * End-to-end greedy decode speed of the served engine for each device and plan. Every session is
 * built and warmed first (a cold WASM session runs several times slower while V8 tiers up), then all
 * of them are timed in alternating rounds inside this one process, the order flipping each round,
 * so drift in the machine's load falls on all alike. Each figure is a median with its range.
 */
export async function benchDecode(
  assets: ModelAssets,
  plans: FusionPlan[],
  devices: Backend[],
  tokens: number,
  rounds: number,
  formatOn: (device: Backend) => GraphOptions = () => FLOAT_WEIGHTS,
  weightsFor?: (format: GraphOptions) => WeightCache,
): Promise<DecodeBench> {
  const prompt = assets.tokenizer.encode(BENCH_PROMPT);
  const instances: ModelInstance[] = [];
  const skipped: DecodeBench["skipped"] = [];
  try {
    for (const device of devices) {
      try {
        const format = formatOn(device);
        for (const plan of plans) {
          instances.push(await buildInstance(assets, plan, device, format, weightsFor?.(format)));
        }
      } catch (e) {
        if (!isNative(device)) throw e;
        skipped.push({ device, reason: (e as Error).message.split("\n")[0] });
      }
    }
    const runs = instances.map((inst) => generator(inst, prompt));
    const samples: Sample[][] = await inRounds(runs, rounds, (run) => decodePass(run, tokens), 2);
    const rate = samples.map((s) => spread(s.map((x) => x.tokensPerSecond)));
    const cases = instances.map((inst, i): DecodeCase => {
      const first = instances.findIndex((x) => x.device === inst.device);
      return {
        device: inst.device,
        plan: inst.planId,
        sampling: inst.device === "webgpu" ? "gpu" : "host",
        tokens,
        rounds,
        prefill_ms: spread(samples[i].map((x) => x.prefillMs)),
        tokens_per_second: rate[i],
        tokens_per_cpu_second: inst.device === "webgpu" || inst.device === "native-webgpu"
          ? null
          : spread(samples[i].map((x) => x.tokensPerCpuSecond)),
        speedup: rate[i].median / rate[first].median,
      };
    });
    return { cases, skipped };
  } finally {
    for (const inst of instances) await inst.release();
  }
}
