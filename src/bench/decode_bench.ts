import process from "node:process";
import type { FusionPlan } from "../fusion/plan.ts";
import { type Spread, spread } from "../numeric.ts";
import { buildInstance, type ModelAssets, type ModelInstance } from "../runtime/engine.ts";
import { generate } from "../runtime/generate.ts";
import type { Device } from "../runtime/ort.ts";
import { DEFAULT_SAMPLING } from "../runtime/sampling.ts";

export interface DecodeCase {
  device: Device;
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
  /** This plan's median decode rate over the first plan's (1 for the first). */
  speedup: number;
}

const PROMPT = "import os\nimport sys\n\ndef main(";

interface Sample {
  prefillMs: number;
  tokensPerSecond: number;
  tokensPerCpuSecond: number;
}

const cpuSeconds = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
};

/** Wall and CPU time of one greedy generation of exactly `tokens` tokens, prefill included. */
async function timeGeneration(assets: ModelAssets, inst: ModelInstance, promptIds: number[], tokens: number) {
  const cfg = assets.checkpoint.config;
  const cpu0 = cpuSeconds();
  const t0 = performance.now();
  const run = generate({
    session: inst.session,
    tokenizer: assets.tokenizer,
    promptIds,
    params: { ...DEFAULT_SAMPLING, maxTokens: tokens, stop: [], ignoreEos: true },
    eosTokenIds: cfg.eosTokenIds,
    maxPositions: cfg.maxPositions,
  });
  let r = await run.next();
  while (!r.done) r = await run.next();
  return { ms: performance.now() - t0, cpu: cpuSeconds() - cpu0 };
}

/**
 * One round for one plan: a 1-token generation (the prefill) and a `tokens`-token one; the decode
 * rate is the difference. Timing whole generations keeps the GPU-resident loop honest: it hands
 * tokens over in batches, so the time of the first one to arrive is not the prefill's.
 */
async function onePass(
  assets: ModelAssets,
  inst: ModelInstance,
  promptIds: number[],
  tokens: number,
): Promise<Sample> {
  const one = await timeGeneration(assets, inst, promptIds, 1);
  const all = await timeGeneration(assets, inst, promptIds, tokens);
  const decoded = tokens - 1;
  return {
    prefillMs: one.ms,
    tokensPerSecond: decoded / (Math.max(all.ms - one.ms, 1e-3) / 1000),
    tokensPerCpuSecond: decoded / Math.max(all.cpu - one.cpu, 1e-6),
  };
}

/**
 * End-to-end greedy decode speed of the served engine for each plan. Every plan's session is built
 * and warmed first (a cold WASM session runs several times slower while V8 tiers up), then the
 * plans are timed in alternating rounds inside this one process, the order flipping each round, so
 * drift in the machine's load falls on all of them alike. Each figure is a median with its range.
 */
export async function benchDecode(
  assets: ModelAssets,
  plans: FusionPlan[],
  device: Device,
  tokens: number,
  rounds: number,
): Promise<DecodeCase[]> {
  const prompt = assets.tokenizer.encode(PROMPT);
  const instances: ModelInstance[] = [];
  try {
    for (const plan of plans) instances.push(await buildInstance(assets, plan, device));
    for (const inst of instances) for (let w = 0; w < 2; w++) await onePass(assets, inst, prompt, tokens);
    const samples: Sample[][] = instances.map(() => []);
    for (let round = 0; round < rounds; round++) {
      const order = instances.map((_, i) => i);
      if (round % 2) order.reverse();
      for (const i of order) samples[i].push(await onePass(assets, instances[i], prompt, tokens));
    }
    const rate = samples.map((s) => spread(s.map((x) => x.tokensPerSecond)));
    return instances.map((inst, i) => ({
      device,
      plan: inst.planId,
      sampling: device === "webgpu" ? "gpu" : "host",
      tokens,
      rounds,
      prefill_ms: spread(samples[i].map((x) => x.prefillMs)),
      tokens_per_second: rate[i],
      tokens_per_cpu_second: device === "wasm" ? spread(samples[i].map((x) => x.tokensPerCpuSecond)) : null,
      speedup: rate[i].median / rate[0].median,
    }));
  } finally {
    for (const inst of instances) await inst.session.release();
  }
}
