import { loadAssets } from "../runtime/engine.ts";
import { type Device, resolveDevice } from "../runtime/ort.ts";
import { requestGpu } from "../webgpu/device.ts";
import type { WeightType } from "../webgpu/ffn.ts";
import { benchDecode, type DecodeCase } from "./decode_bench.ts";
import { benchFfn, type FfnBenchReport } from "./ffn_bench.ts";
import { benchOnnxFfn, type OnnxFfnReport } from "./onnx_bench.ts";
import { checkpointRun, type PresetName, presetRun } from "./shapes.ts";

export interface BenchOptions {
  model?: string;
  preset?: PresetName;
  device: Device | "auto";
  k: number;
  tokens: number[];
  weightType?: WeightType;
  decodeTokens: number;
}

export interface BenchReport {
  date: string;
  device: Device;
  source: string;
  ffn_kernels: FfnBenchReport | null;
  ffn_onnx: OnnxFfnReport;
  decode: DecodeCase[];
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
  const assets = opts.model ? await loadAssets(opts.model) : null;
  const run = assets
    ? checkpointRun(assets.checkpoint, opts.k)
    : presetRun(opts.preset ?? "tiny-nas", opts.k);
  let kernels: FfnBenchReport | null = null;
  if (device === "webgpu") {
    log(`WGSL kernels: ${run.source}`);
    const gpu = await requestGpu();
    const weightType = opts.weightType ?? (gpu.hasF16 ? "f16" : "f32");
    kernels = await benchFfn(gpu, run, {
      tokens: opts.tokens,
      weightType,
      tolerance: weightType === "f16" ? 2e-3 : 1e-4,
    });
    gpu.device.destroy();
  }
  log(`onnxruntime-web graphs on ${device}`);
  const onnx = await benchOnnxFfn(run, device, opts.tokens);
  const decode: DecodeCase[] = [];
  if (assets) {
    const plans = [{ version: 1 as const, ffn_groups: [] }, {
      version: 1 as const,
      ffn_groups: [run.layers],
    }];
    // WASM always exists, so a WebGPU run also reports the CPU fallback for comparison.
    for (const d of device === "webgpu" ? ["webgpu", "wasm"] as const : [device]) {
      log(`decode on ${d}`);
      decode.push(...await benchDecode(assets, plans, d, opts.decodeTokens));
    }
  }
  return {
    date: new Date().toISOString(),
    device,
    source: run.source,
    ffn_kernels: kernels,
    ffn_onnx: onnx,
    decode,
  };
}

const f = (x: number, d = 3) => x.toFixed(d);

/** A readable summary of a report: one table per section. */
export function formatBench(r: BenchReport): string {
  const lines: string[] = [`fusedge bench ${r.date} on ${r.device}: ${r.source}`];
  const k = r.ffn_kernels;
  if (k) {
    lines.push(
      "",
      `WGSL FFN kernels (${k.adapter}, ${k.weight_type} weights, d=${k.d}, k=${k.k} x n=${
        k.n_per_layer[0]
      }); streaming read ${f(k.streaming_read_gbps, 1)} GB/s`,
      "T      sequential ms  fused ms  fused/seq  fused GB/s  of read bw  max rel err",
    );
    for (const c of k.cases) {
      lines.push(
        `${String(c.tokens).padEnd(6)} ${f(c.sequential_ms).padStart(13)}  ${f(c.fused_ms).padStart(8)}  ${
          f(c.speedup, 2).padStart(8)
        }x  ${f(c.fused_gbps, 1).padStart(10)}  ${
          (100 * c.fused_fraction_of_read_bw).toFixed(1).padStart(9)
        }%  ${Math.max(c.sequential_rel_err, c.fused_rel_err).toExponential(1)}`,
      );
    }
  }
  const o = r.ffn_onnx;
  const created = `${f(o.session_create_ms.sequential, 0)} / ${f(o.session_create_ms.fused, 0)} ms`;
  lines.push(
    "",
    `onnxruntime-web FFN graphs (${o.device}; ${f(o.graph_mb, 1)} MB each, sessions created in ${created})`,
    "T      sequential ms  fused ms  fused/seq",
  );
  for (const c of r.ffn_onnx.cases) {
    lines.push(
      `${String(c.tokens).padEnd(6)} ${f(c.sequential_ms).padStart(13)}  ${f(c.fused_ms).padStart(8)}  ${
        f(c.speedup, 2).padStart(8)
      }x`,
    );
  }
  if (r.decode.length) {
    lines.push(
      "",
      "decode (greedy, after the first token)",
      "device  plan                 sampling  tokens/s  prefill ms",
    );
    for (const c of r.decode) {
      const cols = [
        c.device.padEnd(7),
        c.plan.padEnd(20),
        c.sampling.padEnd(8),
        f(c.tokens_per_second, 1).padStart(9),
      ];
      lines.push(`${cols.join(" ")}  ${f(c.prefill_ms, 1).padStart(10)}`);
    }
  }
  return lines.join("\n");
}
