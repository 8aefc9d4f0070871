import { InputError } from "../errors.ts";
import type { Checkpoint } from "../model/checkpoint.ts";
import { type FusionPlan, planId, validatePlan } from "../fusion/plan.ts";
import {
  type FloatType,
  type FormatName,
  formatName,
  type GraphOptions,
  parseFormatName,
  type Quantization,
} from "../onnx/format.ts";
import { WeightCache } from "../onnx/weight_cache.ts";
import { assetsFrom, loadAssets } from "../instance/build.ts";
import {
  adapterMaxBuffer,
  type Backend,
  type Device,
  resolveDevice,
  resolveGraphOptions,
} from "../ort/ort.ts";
import { requestGpu } from "../webgpu/device.ts";
import { BENCH_PROMPT, benchDecode, type DecodeCase } from "./decode_bench.ts";
import { type BatchCase, benchBatch } from "./batch_bench.ts";
import { benchFfn, type FfnBenchReport } from "./ffn_bench.ts";
import { benchOnnxFfn, type OnnxFfnReport } from "./onnx_bench.ts";
import { checkpointRun, type PresetName, presetRun, PRESETS } from "./shapes.ts";
import { benchServing, type ServingBench, servingFormats } from "./serving_bench.ts";
import { checkModelFits } from "../ort/memory.ts";
import type { StepProfile } from "./step_profile.ts";

export interface BenchOptions {
  model?: string;
  preset?: PresetName;
  device: Device | "auto";
  k: number;
  tokens: number[];
  /** Float type of the WGSL kernels and the WebGPU graphs (CPU graphs are fp32). */
  dtype: FloatType | "auto";
  decodeTokens: number;
  /** Alternating rounds per measurement. */
  rounds: number;
  /** Also decode with native onnxruntime on the CPU (onnxruntime-node), the reference for WASM. */
  native?: boolean;
  /** Leave out the WASM fallback's decode that a webgpu or cpu run reports beside its own. */
  skipWasm?: boolean;
  /** Weight format of the onnxruntime graphs (FFN stacks and decode); the WGSL kernels use --dtype. */
  quantize?: Quantization;
  /** The model's checkpoint when already loaded (the server's). */
  checkpoint?: Checkpoint;
  /** Weight formats to serve the model in end to end (`all`: every one the device supports). */
  formats?: (FormatName | "all")[];
  /** Decode batch sizes to measure, unfused against the fused plan. */
  batch?: number[];
  /** Each batched case also under a grammar (constrained decoding's cost). */
  constrained?: boolean;
  /** More plans to decode beside the unfused model and the k-layer group (a frontier's best plans). */
  plans?: FusionPlan[];
}

/** Where a benchmark's memory must fit: the host, and WASM's 32-bit heap. */
export interface MemoryLimits {
  hostAvailableBytes: number;
  wasmHeapBytes: number;
}

const GiB = 2 ** 30;

/** The context a benchmark's model is loaded with: its KV cache need not cover the model's whole window. */
const BENCH_CONTEXT = 4096;

/** The process's peak resident memory so far (Linux), or its current one elsewhere. */
function peakRss(): number {
  try {
    return Number(/VmHWM:\s+(\d+)/.exec(Deno.readTextFileSync("/proc/self/status"))![1]) * 1024;
  } catch {
    return Deno.memoryUsage().rss;
  }
}

export function memoryLimits(): MemoryLimits {
  return { hostAvailableBytes: Deno.systemMemoryInfo().available, wasmHeapBytes: 4 * GiB };
}

/**
 * Refuses, before anything is allocated, a benchmark whose FFN graphs cannot fit. Each onnxruntime
 * graph holds k x 3 fp32 matrices of d x n; onnxruntime-web keeps both sessions in one WASM heap and
 * briefly a third copy while creating one; the host holds the random weights, the fused copy, both
 * protobufs and the heap: about 10x one graph.
 */
export function checkBenchFits(d: number, n: number, k: number, device: Device, limits: MemoryLimits): void {
  const graph = k * 3 * d * n * 4;
  const gb = (b: number) => `${(b / 1e9).toFixed(1)} GB`;
  if (device === "wasm" && 3 * graph > limits.wasmHeapBytes) {
    throw new InputError(
      `two FFN graphs of ${gb(graph)} (k=${k}, ${d}x${n}) do not fit WASM's ${
        gb(limits.wasmHeapBytes)
      } heap (needs about ${gb(3 * graph)}); use a smaller k or preset, or --device webgpu`,
      "preset",
    );
  }
  const host = 10 * graph;
  if (host > limits.hostAvailableBytes) {
    throw new InputError(
      `the FFN graphs (k=${k}, ${d}x${n}) need about ${gb(host)} of host memory; ${
        gb(limits.hostAvailableBytes)
      } is available (try a smaller k or preset)`,
      "preset",
    );
  }
}

export interface BenchReport {
  date: string;
  device: Device;
  /** Weight format of the onnxruntime graphs (absent in reports from before it existed: fp32, none). */
  dtype?: FloatType;
  quantize?: Quantization;
  source: string;
  ffn_kernels: FfnBenchReport | null;
  ffn_onnx: OnnxFfnReport;
  decode: DecodeCase[];
  /** Decode devices that could not run here, and why. */
  decode_skipped: { device: string; reason: string }[];
  /** The checkpoint read from disk (absent when the server's copy was used). */
  load?: { ms: number; peak_rss_mb: number };
  /** The model served end to end per weight format (with --formats). */
  serving?: ServingBench;
  /** Batched decode, unfused against the fused plan, per batch size (with --batch). */
  batched?: BatchCase[];
  /** Where each batched case's decode step goes (with --batch). */
  steps?: StepProfile[];
}

/**
 * The plans a checkpoint's decode is benchmarked under: unfused, and the group of the benchmarked FFN
 * layers when they are an attention-free run (a model with attention in every layer, such as a plain
 * Llama, has none: its FFN graphs are still measured, its decode only unfused).
 */
function benchPlans(ckpt: Checkpoint, layers: number[]): FusionPlan[] {
  const unfused: FusionPlan = { version: 1, ffn_groups: [] };
  try {
    return [unfused, validatePlan({ ffn_groups: [layers] }, ckpt.config)];
  } catch {
    return [unfused];
  }
}

/**
 * The self-benchmark: sequential against fused FFN execution with the WGSL kernels (WebGPU only),
 * the same through onnxruntime-web graphs, and, for a checkpoint, end-to-end decode unfused against
 * the plan that fuses the benchmarked layers.
 */
export async function runBench(
  opts: BenchOptions,
  log: (line: string) => void = () => {},
): Promise<BenchReport> {
  const device = await resolveDevice(opts.device);
  if (!opts.model) {
    const { d, n } = PRESETS[opts.preset ?? "tiny-nas"];
    checkBenchFits(d, n, opts.k, device, memoryLimits());
  }
  const t0 = performance.now();
  const assets = opts.model
    ? opts.checkpoint
      ? await assetsFrom(opts.checkpoint, opts.model)
      : await loadAssets(opts.model, { maxContext: BENCH_CONTEXT })
    : null;
  const load = opts.model && !opts.checkpoint
    ? { ms: performance.now() - t0, peak_rss_mb: peakRss() / 1e6 }
    : undefined;
  const run = assets
    ? checkpointRun(assets.checkpoint, opts.k)
    : presetRun(opts.preset ?? "tiny-nas", opts.k);
  const graph = await resolveGraphOptions(opts.dtype, opts.quantize ?? "none", device);
  let kernels: FfnBenchReport | null = null;
  if (device === "webgpu") {
    log(`WGSL kernels: ${run.source}`);
    const gpu = await requestGpu();
    const weightType = graph.dtype === "fp16" ? "f16" : "f32";
    kernels = await benchFfn(gpu, run, {
      tokens: opts.tokens,
      weightType,
      tolerance: weightType === "f16" ? 2e-3 : 1e-4,
    });
    gpu.device.destroy();
  }
  log(`onnxruntime-web graphs on ${device}`);
  const onnx = await benchOnnxFfn(run, device, opts.tokens, opts.rounds, graph);
  // One weight cache per format for every instance built here (keyed as buildInstance keys its own;
  // the integer path's weights have names of their own): a plan's build then converts (fuses, casts,
  // quantizes) only the groups the last build did not, as a server's swaps do.
  const caches = new Map<string, WeightCache>();
  const weightsFor = (format: GraphOptions) => {
    const name = formatName(format);
    if (!caches.has(name)) caches.set(name, new WeightCache(name));
    return caches.get(name)!;
  };
  const decode: DecodeCase[] = [];
  const skipped: BenchReport["decode_skipped"] = [];
  const fits = (format: GraphOptions, on: Device) => {
    try {
      checkModelFits(assets!.checkpoint.config, format, on, { sequences: 2 });
      return true;
    } catch (e) {
      skipped.push({ device: on, reason: (e as Error).message });
      return false;
    }
  };
  // The GPU's graphs take the requested float type; the CPU's are fp32 (native quantized ones compute in int8).
  const formatOn = async (d: Backend) =>
    d === "webgpu" || d === "native-webgpu" ? graph : await resolveGraphOptions("fp32", graph.quantize, d);
  if (assets) {
    const fused = benchPlans(assets.checkpoint, run.layers);
    // Each plan once: a frontier plan may be the k-layer group itself.
    const plans = [...fused, ...opts.plans ?? []].filter((p, i, all) =>
      all.findIndex((q) => planId(q) === planId(p)) === i
    );
    // WASM always exists, so a WebGPU or native run also reports the WASM fallback (unless skipWasm); the GPU is timed on
    // its own (its rounds would otherwise wait on the CPU ones), the CPU backends alternated together.
    const wasm: Backend[] = opts.skipWasm && device !== "wasm" ? [] : ["wasm"];
    const cpuSide: Backend[] = device === "webgpu" ? wasm : [device, ...wasm].filter(
      (d, i, all) => all.indexOf(d) === i,
    ) as Backend[];
    if (opts.native && !cpuSide.includes("cpu")) cpuSide.push("cpu");
    const groups: Backend[][] = device === "webgpu"
      ? [opts.native ? ["webgpu", "native-webgpu"] : ["webgpu"], cpuSide]
      : [cpuSide];
    for (const devices of groups.filter((g) => g.length)) {
      const formats = new Map<Backend, GraphOptions>();
      for (const d of devices) formats.set(d, await formatOn(d));
      // Both plans' sessions share one WASM heap here: a model too big for that is left to --formats.
      if (!devices.every((d) => d === "native-webgpu" || fits(formats.get(d)!, d))) continue;
      log(`decode on ${devices.join(" and ")}`);
      const r = await benchDecode(
        assets,
        plans,
        devices,
        opts.decodeTokens,
        opts.rounds,
        (d) => formats.get(d)!,
        weightsFor,
      );
      decode.push(...r.cases);
      skipped.push(...r.skipped);
    }
  }
  let batched: BatchCase[] | undefined;
  let steps: StepProfile[] | undefined;
  if (assets && opts.batch?.length) {
    const format = await formatOn(device);
    if (fits(format, device)) {
      log(`batched decode on ${device}: batch ${opts.batch.join(", ")}`);
      ({ cases: batched, profiles: steps } = await benchBatch(
        assets,
        benchPlans(assets.checkpoint, run.layers),
        device,
        opts.batch,
        opts.decodeTokens,
        opts.rounds,
        format,
        opts.constrained ?? false,
        weightsFor(format),
      ));
    }
  }
  let serving: ServingBench | undefined;
  if (assets && opts.formats?.length) {
    const f16 = (await resolveGraphOptions("auto", "none", device)).dtype === "fp16";
    const formats = opts.formats.includes("all")
      ? servingFormats(device, f16)
      : (opts.formats as FormatName[]).map(parseFormatName);
    serving = await benchServing({
      modelDir: opts.model!,
      checkpoint: assets.checkpoint,
      promptIds: assets.tokenizer.encode(BENCH_PROMPT),
      device,
      formats,
      fused: { version: 1, ffn_groups: [run.layers] },
      tokens: opts.decodeTokens,
      rounds: opts.rounds,
      maxBufferBytes: await adapterMaxBuffer(device),
      log,
    });
  }
  return {
    date: new Date().toISOString(),
    device,
    dtype: graph.dtype,
    quantize: graph.quantize,
    source: run.source,
    ffn_kernels: kernels,
    ffn_onnx: onnx,
    decode,
    decode_skipped: skipped,
    load,
    serving,
    batched,
    steps,
  };
}

const f = (x: number, d = 3) => x.toFixed(d);
type Spread = DecodeCase["tokens_per_second"];
const sp = (s: Spread, d = 1) => `${f(s.median, d)} [${f(s.min, d)}-${f(s.max, d)}]`;

/** A readable summary of a report: one table per section. */
/** Results written before ranges were recorded show the median alone. */
const ranged = (m: number, range?: [number, number]) =>
  (range ? `${f(m)} [${f(range[0])}-${f(range[1])}]` : f(m)).padEnd(22);

function formatKernels(k: FfnBenchReport): string[] {
  const lines: string[] = [];
  lines.push(
    "",
    `WGSL FFN kernels (${k.adapter}, ${k.weight_type} weights, d=${k.d}, k=${k.k} x n=${
      k.n_per_layer[0]
    }); streaming read ${f(k.streaming_read_gbps, 1)} GB/s; median [min-max] of alternating rounds`,
    "T      sequential ms          fused ms               fused/seq  fused GB/s  of read bw  max rel err",
  );
  for (const c of k.cases) {
    lines.push(
      `${String(c.tokens).padEnd(6)} ${ranged(c.sequential_ms, c.sequential_range_ms)} ${
        ranged(c.fused_ms, c.fused_range_ms)
      } ${f(c.speedup, 2).padStart(8)}x  ${f(c.fused_gbps, 1).padStart(10)}  ${
        (100 * c.fused_fraction_of_read_bw).toFixed(1).padStart(9)
      }%  ${Math.max(c.sequential_rel_err, c.fused_rel_err).toExponential(1)}`,
    );
  }
  return lines;
}

function formatOnnx(r: BenchReport): string[] {
  const lines: string[] = [];
  const o = r.ffn_onnx;
  const created = `${f(o.session_create_ms.sequential, 0)} / ${f(o.session_create_ms.fused, 0)} ms`;
  lines.push(
    "",
    `onnxruntime-web FFN graphs (${o.device}; ${
      f(o.graph_mb, 1)
    } MB each, sessions created in ${created}; median [min-max] of alternating rounds)`,
    "T      sequential ms          fused ms               fused/seq",
  );
  for (const c of r.ffn_onnx.cases) {
    lines.push(
      `${String(c.tokens).padEnd(6)} ${ranged(c.sequential_ms, c.sequential_range_ms)} ${
        ranged(c.fused_ms, c.fused_range_ms)
      } ${f(c.speedup, 2)}x`,
    );
  }
  return lines;
}

function formatDecode(r: BenchReport): string[] {
  const lines: string[] = [];
  lines.push(
    "",
    `decode (greedy, warm sessions, plans alternated in ${r.decode[0].rounds} rounds; median [min-max])`,
    "device  plan                 sampling  tokens/s                 vs first  tokens/CPU-s             prefill ms",
  );
  for (const c of r.decode) {
    const cols = [
      c.device.padEnd(7),
      c.plan.padEnd(20),
      c.sampling.padEnd(8),
      sp(c.tokens_per_second).padEnd(24),
      `${f(c.speedup, 2)}x`.padEnd(8),
      (c.tokens_per_cpu_second ? sp(c.tokens_per_cpu_second) : "-").padEnd(24),
      sp(c.prefill_ms),
    ];
    lines.push(cols.join(" "));
  }
  const against = { cpu: "wasm", "native-webgpu": "webgpu" } as const;
  for (const n of r.decode.filter((c) => c.device === "cpu" || c.device === "native-webgpu")) {
    const ref = against[n.device as keyof typeof against];
    const w = r.decode.find((c) => c.device === ref && c.plan === n.plan);
    if (!w) continue;
    lines.push(
      `${n.device}/${ref} ${n.plan}: decode ${
        f(n.tokens_per_second.median / w.tokens_per_second.median, 2)
      }x, ` +
        `prefill ${f(w.prefill_ms.median / n.prefill_ms.median, 2)}x`,
    );
  }
  return lines;
}

function formatBatched(batched: BatchCase[]): string[] {
  const lines: string[] = [];
  const b = batched[0];
  lines.push(
    "",
    `batched decode (${b.steps} steps per sample, cases alternated in ${b.rounds} rounds; median [min-max])`,
    "device  plan                 batch  grammar  tokens/s                 vs first  ms per step          tokens/CPU-s",
  );
  for (const c of batched) {
    lines.push([
      ...caseCells(c),
      (c.constrained ? "yes" : "no").padEnd(8),
      sp(c.tokens_per_second).padEnd(24),
      `${f(c.speedup, 2)}x`.padEnd(8),
      sp(c.ms_per_step, 2).padEnd(20),
      c.tokens_per_cpu_second ? sp(c.tokens_per_cpu_second) : "-",
    ].join(" "));
  }
  return lines;
}

function formatServing(sv: ServingBench): string[] {
  const lines: string[] = [];
  lines.push(
    "",
    `served end to end on ${sv.device}, each plan in its own worker: unfused, then ${sv.fused_plan} built as a swap ` +
      `through the unfused plan's converted weights; ${sv.tokens}-token greedy decode, ${sv.rounds} alternating rounds`,
    "format      weights MB  build s  session s  swap s  rebuilt MB  plan                tokens/s                 vs unfused  tokens/CPU-s             peak RSS GB",
  );
  for (const c of sv.cases) {
    c.decode.forEach((d, i) => {
      const head = i === 0
        ? [
          c.format.padEnd(11),
          f(c.weight_mb, 0).padStart(10),
          f(c.build_ms / 1000, 1).padStart(7),
          f(c.session_create_ms / 1000, 1).padStart(9),
          f(c.swap.ms / 1000, 1).padStart(6),
          f(c.swap.rebuilt_mb, 0).padStart(10),
        ]
        : ["".padEnd(11), "".padStart(10), "".padStart(7), "".padStart(9), "".padStart(6), "".padStart(10)];
      lines.push([
        ...head,
        d.plan.padEnd(19),
        sp(d.tokens_per_second, 2).padEnd(24),
        `${f(d.speedup, 2)}x`.padEnd(10),
        (d.tokens_per_cpu_second ? sp(d.tokens_per_cpu_second, 2) : "-").padEnd(24),
        i === 0 ? f(c.peak_rss_mb / 1000, 2) : "",
      ].join(" "));
    });
  }
  for (const s of sv.skipped) lines.push(`(${s.format} skipped: ${s.reason})`);
  return lines;
}

/** The report as text tables, one section per measurement it holds. */
export function formatBench(r: BenchReport): string {
  const lines: string[] = [
    `fusedge bench ${r.date} on ${r.device}: ${r.source}${
      r.dtype === "fp16" || (r.quantize && r.quantize !== "none")
        ? `, ${
          formatName({ dtype: r.dtype ?? "fp32", quantize: r.quantize ?? "none" })
        } weights in the ${r.device} graphs`
        : ""
    }`,
  ];
  if (r.ffn_kernels) lines.push(...formatKernels(r.ffn_kernels));
  lines.push(...formatOnnx(r));
  if (r.decode.length) lines.push(...formatDecode(r));
  for (const s of r.decode_skipped ?? []) lines.push(`(${s.device} decode skipped: ${s.reason})`);
  if (r.batched?.length) lines.push(...formatBatched(r.batched));
  lines.push(...formatSteps(r), ...formatPredicted(r));
  if (r.load) {
    lines.push(
      "",
      `checkpoint loaded in ${f(r.load.ms / 1000, 1)} s, peak RSS ${f(r.load.peak_rss_mb / 1000, 2)} GB`,
    );
  }
  if (r.serving) lines.push(...formatServing(r.serving));
  return lines.join("\n");
}

/** The cells that name a batched case: device, plan and batch size. */
const caseCells = (c: { device: string; plan: string; batch: number }) => [
  c.device.padEnd(7),
  c.plan.padEnd(20),
  String(c.batch).padEnd(6),
];

/** Where each batched case's step goes: what it asks of the device, host and GPU milliseconds. */
function formatSteps(r: BenchReport): string[] {
  if (!r.steps?.length) return [];
  const n = (x: number | null) => (x === null ? "-" : f(x, x % 1 ? 1 : 0)).padStart(6);
  const lines = [
    "",
    `where a decode step goes (${
      r.steps[0].steps
    } steps after a warm-up; per step; host ms leaves out time ` +
    "inside queue.submit, GPU ms spans the step's commands by timestamp queries)",
    "device  plan                 batch  nodes  dispatches  submits  readbacks  bind groups  writes  host ms              GPU ms",
  ];
  for (const p of r.steps) {
    lines.push([
      ...caseCells(p),
      String(p.nodes).padStart(5),
      n(p.dispatches).padStart(11),
      n(p.submits).padStart(8),
      n(p.readbacks).padStart(10),
      n(p.bind_groups).padStart(12),
      n(p.writes).padStart(7),
      " " + sp(p.host_ms, 2).padEnd(20),
      p.gpu_ms ? sp(p.gpu_ms, 2) : "-",
    ].join(" "));
  }
  return lines;
}

/**
 * Fusion's end-to-end gain at each batch size beside the one the FFN kernels predict: the fused
 * group saves (sequential - fused) ms of an unfused step of s ms, so the step should speed up by
 * s / (s - saving). A measured gain far below the prediction means the step's time is elsewhere.
 */
function formatPredicted(r: BenchReport): string[] {
  const lines: string[] = [];
  const plain = (r.batched ?? []).filter((c) => !c.constrained);
  for (const fused of plain) {
    const unfused = plain.find((c) => c.batch === fused.batch && c.device === fused.device);
    const kernels = r.ffn_onnx.cases.find((c) => c.tokens === fused.batch);
    if (!unfused || unfused === fused || !kernels) continue;
    const step = unfused.ms_per_step.median;
    const saving = kernels.sequential_ms - kernels.fused_ms;
    const measured = `fused/unfused at batch ${fused.batch} (${fused.plan}): measured ${
      f(fused.speedup, 2)
    }x`;
    // The FFN graphs run as sessions of their own, uncaptured: on a GPU their per-run cost can exceed
    // a whole captured step, and then they predict nothing.
    lines.push(
      saving >= step
        ? `${measured}; the FFN graphs, run uncaptured, save ${f(saving, 2)} ms, more than the whole ` +
          `${f(step, 2)} ms step: no prediction`
        : `${measured}, predicted ${f(step / (step - saving), 2)}x from the FFN graphs (they save ` +
          `${f(saving, 2)} ms of a ${f(step, 2)} ms step)`,
    );
  }
  return lines.length ? ["", ...lines] : [];
}
