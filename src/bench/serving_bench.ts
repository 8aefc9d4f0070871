import { type FusionPlan, planId, UNFUSED } from "../fusion/plan.ts";
import type { Checkpoint } from "../model/checkpoint.ts";
import { type Spread, spread } from "../numeric.ts";
import { FLOAT_WEIGHTS, formatName, type GraphOptions } from "../onnx/format.ts";
import { type WeightEntries, WeightStore } from "../onnx/weight_cache.ts";
import { checkModelFits } from "../ort/memory.ts";
import { type Device, resolveGraphOptions } from "../ort/ort.ts";
import { type PlanInstance, RemoteInstance } from "../instance/remote_instance.ts";
import { DEFAULT_SAMPLING } from "../sampling/sampling.ts";
import { decodePass, type GenerateTokens, type Sample } from "./decode_bench.ts";

/** One weight format served end to end: building, swapping to the fused plan, decoding both. */
export interface ServingCase {
  format: string;
  weight_mb: number;
  /** The unfused instance: total build (fuse, convert, session) and the session creation within it. */
  build_ms: number;
  session_create_ms: number;
  /** Building the fused plan through the unfused one's converted weights, as a /fuse swap does. */
  swap: { plan: string; ms: number; session_create_ms: number; rebuilt_mb: number; reused_mb: number };
  decode: {
    plan: string;
    prefill_ms: Spread;
    tokens_per_second: Spread;
    /** CPU time of the whole process (the workers decode); null on WebGPU. */
    tokens_per_cpu_second: Spread | null;
    speedup: number;
  }[];
  /** Highest resident memory of the process sampled while this format was built and decoded. */
  peak_rss_mb: number;
}

export interface ServingBench {
  device: Device;
  fused_plan: string;
  tokens: number;
  rounds: number;
  cases: ServingCase[];
  /** Formats this device cannot run or hold, and why. */
  skipped: { format: string; reason: string }[];
}

/**
 * The formats a device can serve. On WebGPU with shader-f16: fp16, and fp16 activations with int8 and
 * int4 weights (MatMulNBits, which accumulates in fp32 where fp16 MatMul does not), then fp32.
 */
export function servingFormats(device: Device, f16: boolean): GraphOptions[] {
  const quantized = ["none", "int8", "int4"] as const;
  if (device === "wasm" || !f16) return quantized.map((quantize) => ({ dtype: "fp32", quantize }));
  return [...quantized.map((quantize) => ({ dtype: "fp16" as const, quantize })), FLOAT_WEIGHTS];
}

const mb = (bytes: number) => bytes / 1e6;

/** Peak resident memory between start() and stop(), sampled every 50 ms (the workers included). */
class RssSampler {
  private peak = 0;
  private timer: ReturnType<typeof setInterval> | undefined;

  start(): void {
    this.peak = Deno.memoryUsage().rss;
    this.timer = setInterval(() => (this.peak = Math.max(this.peak, Deno.memoryUsage().rss)), 50);
  }

  stop(): number {
    clearInterval(this.timer);
    return Math.max(this.peak, Deno.memoryUsage().rss);
  }
}

/** A worker instance's generation, for decodePass. */
const generator = (inst: PlanInstance, promptIds: number[]): GenerateTokens => async (tokens) => {
  const params = { ...DEFAULT_SAMPLING, maxTokens: tokens, stop: [], ignoreEos: true };
  for await (const _ of inst.generate(promptIds, params, new AbortController().signal));
};

export interface ServingBenchOptions {
  modelDir: string;
  /** The loaded checkpoint (file-backed): every instance worker reads the weights from its files. */
  checkpoint: Checkpoint;
  promptIds: number[];
  device: Device;
  formats: GraphOptions[];
  fused: FusionPlan;
  tokens: number;
  rounds: number;
  maxBufferBytes?: number;
  log?: (line: string) => void;
}

/**
 * The served engine at the model's real size, per weight format: each plan in its own worker as the
 * server runs it (a WASM heap each), the fused plan built through the unfused one's converted
 * weights as a swap is, then both decoded in alternating rounds after a warm-up.
 */
export async function benchServing(o: ServingBenchOptions): Promise<ServingBench> {
  const cases: ServingCase[] = [];
  const skipped: ServingBench["skipped"] = [];
  const cfg = o.checkpoint.config;
  for (const format of o.formats) {
    const name = formatName(format);
    try {
      await resolveGraphOptions(format.dtype, format.quantize, o.device);
      checkModelFits(cfg, format, o.device, { sequences: 1, maxBufferBytes: o.maxBufferBytes });
    } catch (e) {
      skipped.push({ format: name, reason: (e as Error).message });
      continue;
    }
    o.log?.(`serving ${name}: building the unfused and the fused plan`);
    const rss = new RssSampler();
    rss.start();
    const live: PlanInstance[] = [];
    const store = new WeightStore();
    try {
      // Wall time as the caller sees it: worker start, fusing, converting and the session.
      const build = async (plan: FusionPlan, weights: WeightEntries) => {
        const t0 = performance.now();
        const built = await RemoteInstance.build({
          modelDir: o.modelDir,
          checkpoint: o.checkpoint,
          plan,
          planId: planId(plan),
          device: o.device,
          graph: format,
          weights,
          weightDir: store.buildDir(),
        }).ready;
        live.push(built.instance);
        return { ...built, wallMs: performance.now() - t0 };
      };
      const base = await build(UNFUSED, new Map());
      const fused = await build(o.fused, base.weights.added);
      const instances = [base.instance, fused.instance];
      const runs = instances.map((inst) => generator(inst, o.promptIds));
      for (const run of runs) await run(o.tokens);
      const samples: Sample[][] = instances.map(() => []);
      for (let round = 0; round < o.rounds; round++) {
        o.log?.(`serving ${name}: round ${round + 1} of ${o.rounds}`);
        const order = round % 2 ? [1, 0] : [0, 1];
        for (const i of order) samples[i].push(await decodePass(runs[i], o.tokens));
      }
      const rates = samples.map((s) => spread(s.map((x) => x.tokensPerSecond)));
      cases.push({
        format: name,
        weight_mb: mb(base.instance.weightBytes),
        build_ms: base.wallMs,
        session_create_ms: base.sessionMs,
        swap: {
          plan: fused.instance.planId,
          ms: fused.wallMs,
          session_create_ms: fused.sessionMs,
          rebuilt_mb: mb(fused.weights.rebuiltBytes),
          reused_mb: mb(fused.weights.reusedBytes),
        },
        decode: instances.map((inst, i) => ({
          plan: inst.planId,
          prefill_ms: spread(samples[i].map((x) => x.prefillMs)),
          tokens_per_second: rates[i],
          tokens_per_cpu_second: o.device === "webgpu"
            ? null
            : spread(samples[i].map((x) => x.tokensPerCpuSecond)),
          speedup: rates[i].median / rates[0].median,
        })),
        peak_rss_mb: mb(rss.stop()),
      });
    } finally {
      rss.stop();
      await Promise.all(live.map((inst) => inst.close()));
      store.close();
    }
  }
  return {
    device: o.device,
    fused_plan: planId(o.fused),
    tokens: o.tokens,
    rounds: o.rounds,
    cases,
    skipped,
  };
}
