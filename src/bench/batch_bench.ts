import type { FusionPlan } from "../fusion/plan.ts";
import { type Spread, spread } from "../numeric.ts";
import type { GraphOptions } from "../onnx/format.ts";
import { buildInstance, type ModelAssets, type ModelInstance } from "../runtime/engine.ts";
import type { Backend } from "../runtime/ort.ts";
import { asBatch, type KvCache } from "../runtime/session.ts";
import { BENCH_PROMPT, cpuSeconds } from "./decode_bench.ts";

/** Decode throughput of one plan at one batch size: the paper's cost axis. */
export interface BatchCase {
  device: Backend;
  plan: string;
  /** Sequences decoded together, one token each per step. */
  batch: number;
  steps: number;
  rounds: number;
  /** Tokens (all rows together) per wall-clock second. */
  tokens_per_second: Spread;
  ms_per_step: Spread;
  /** Tokens per second of this process's CPU time (null on WebGPU, where the work is the GPU's). */
  tokens_per_cpu_second: Spread | null;
  /** This plan's median rate over the first plan's at the same batch size (1 for the first). */
  speedup: number;
}

/**
 * Batched decode steps of each plan at each batch size: every row continues the same prefilled prompt,
 * `steps` steps of all rows per sample (the batch engine's step, without sampling). Sessions are built
 * and every case warmed first; then the cases take turns in `rounds` rounds, the order flipped each
 * round, so the machine's drift falls on all alike.
 */
export async function benchBatch(
  assets: ModelAssets,
  plans: FusionPlan[],
  device: Backend,
  sizes: number[],
  steps: number,
  rounds: number,
  graph: GraphOptions,
): Promise<BatchCase[]> {
  const prompt = assets.tokenizer.encode(BENCH_PROMPT);
  const instances: ModelInstance[] = [];
  try {
    for (const plan of plans) instances.push(await buildInstance(assets, plan, device, graph));
    const prefixes: KvCache[] = [];
    for (const inst of instances) {
      prefixes.push((await inst.session.step(prompt, inst.session.emptyCache())).cache);
    }
    const cases = instances.flatMap((inst, i) =>
      sizes.map((batch) => ({ inst, prefix: prefixes[i], batch }))
    );
    const sample = async ({ inst, prefix, batch }: (typeof cases)[number]) => {
      const s = inst.session;
      let cache = await s.packRows(Array.from({ length: batch }, () => ({ cache: asBatch(prefix), row: 0 })));
      const ids = new Array<number>(batch).fill(prompt.at(-1)!);
      const cpu0 = cpuSeconds();
      const t0 = performance.now();
      for (let k = 0; k < steps; k++) cache = (await s.decodeBatch(ids, cache)).cache;
      const ms = performance.now() - t0;
      const cpu = cpuSeconds() - cpu0;
      return {
        ms: ms / steps,
        tps: (batch * steps) / (ms / 1000),
        tpc: (batch * steps) / Math.max(cpu, 1e-6),
      };
    };
    for (const c of cases) await sample(c);
    const samples = cases.map(() => [] as Awaited<ReturnType<typeof sample>>[]);
    for (let round = 0; round < rounds; round++) {
      const order = cases.map((_, i) => i);
      if (round % 2) order.reverse();
      for (const i of order) samples[i].push(await sample(cases[i]));
    }
    const rate = samples.map((s) => spread(s.map((x) => x.tps)));
    return cases.map((c, i) => {
      const first = cases.findIndex((x) => x.batch === c.batch);
      return {
        device,
        plan: c.inst.planId,
        batch: c.batch,
        steps,
        rounds,
        tokens_per_second: rate[i],
        ms_per_step: spread(samples[i].map((x) => x.ms)),
        tokens_per_cpu_second: device === "webgpu" ? null : spread(samples[i].map((x) => x.tpc)),
        speedup: rate[i].median / rate[first].median,
      };
    });
  } finally {
    for (const inst of instances) await inst.session.release();
  }
}
