import type { FusionPlan } from "../fusion/plan.ts";
import { type Spread, spread } from "../numeric.ts";
import type { GraphOptions } from "../onnx/format.ts";
import type { WeightCache } from "../onnx/weight_cache.ts";
import { buildInstance, type ModelAssets, type ModelInstance } from "../instance/build.ts";
import type { Backend } from "../ort/ort.ts";
import type { GrammarSpec } from "../sampling/grammar.ts";
import { BENCH_PROMPT, decodePass, generator } from "./decode_bench.ts";
import { profileSteps, type StepProfile } from "./step_profile.ts";
import { inRounds } from "./rounds.ts";

/** Decode throughput of one plan at one batch size: the paper's cost axis. */
export interface BatchCase {
  device: Backend;
  plan: string;
  /** Sequences decoded together, one token each per step, through the serving engine. */
  batch: number;
  /** Decoded under BENCH_GRAMMAR: every token masked. */
  constrained: boolean;
  steps: number;
  rounds: number;
  /** Tokens (all rows together) per wall-clock second. */
  tokens_per_second: Spread;
  ms_per_step: Spread;
  /** Tokens per second of this process's CPU time (null on WebGPU, where the work is the GPU's). */
  tokens_per_cpu_second: Spread | null;
  /** This case's median rate over the first case's at the same batch size (1 for the first). */
  speedup: number;
}

/**
 * Decode throughput of each plan at each batch size through the engine that serves it: `batch`
 * sequences of the same prompt decoded together, greedy, no prefix reuse, each timed as a 1-token
 * and a (steps + 1)-token run whose difference is the decode (decodePass). Instances are built with
 * a slot for every row and warmed; the cases then take turns in `rounds` rounds, the order flipped
 * each round, so the machine's drift falls on all alike. Then each case's step is profiled
 * (step_profile.ts): what it asks of the device, its host and its GPU time.
 */
export async function benchBatch(
  assets: ModelAssets,
  plans: FusionPlan[],
  device: Backend,
  sizes: number[],
  steps: number,
  rounds: number,
  graph: GraphOptions,
  constrained = false,
  weights?: WeightCache,
): Promise<{ cases: BatchCase[]; profiles: StepProfile[] }> {
  const prompt = assets.tokenizer.encode(BENCH_PROMPT);
  const instances: ModelInstance[] = [];
  try {
    for (const plan of plans) {
      instances.push(
        await buildInstance(assets, plan, device, graph, weights, undefined, { slots: Math.max(...sizes) }),
      );
    }
    // A grammar longer than any run (65 characters a token at most): every step is masked, none ends it.
    const grammar: GrammarSpec = {
      field: "constrained",
      type: "ebnf",
      grammar: `root ::= [a-zA-Z0-9 ,.:_=()]{${(steps + 2) * assets.tokenizer.maxTokenChars()}}`,
    };
    const cases = instances.flatMap((inst) =>
      sizes.flatMap((batch) =>
        (constrained ? [false, true] : [false]).map((c) => ({
          inst,
          batch,
          constrained: c,
          run: generator(inst, prompt, batch, c ? grammar : undefined),
        }))
      )
    );
    const sample = async (c: (typeof cases)[number]) => {
      const s = await decodePass(c.run, steps + 1, c.batch);
      return { tps: s.tokensPerSecond, tpc: s.tokensPerCpuSecond };
    };
    const samples = await inRounds(cases, rounds, sample);
    const rate = samples.map((s) => spread(s.map((x) => x.tps)));
    const profiles: StepProfile[] = [];
    for (const c of cases) {
      if (!c.constrained) profiles.push(await profileSteps(c.inst, prompt, c.batch, steps));
    }
    const measured = cases.map((c, i) => {
      const first = cases.findIndex((x) => x.batch === c.batch);
      return {
        device,
        plan: c.inst.planId,
        batch: c.batch,
        constrained: c.constrained,
        steps,
        rounds,
        tokens_per_second: rate[i],
        ms_per_step: spread(samples[i].map((x) => (1000 * c.batch) / x.tps)),
        tokens_per_cpu_second: device === "webgpu" ? null : spread(samples[i].map((x) => x.tpc)),
        speedup: rate[i].median / rate[first].median,
      };
    });
    return { cases: measured, profiles };
  } finally {
    for (const inst of instances) await inst.release();
  }
}
