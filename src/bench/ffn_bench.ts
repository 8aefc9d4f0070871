import { fuseFfns } from "../fusion/apply.ts";
import type { FfnBlock } from "../model/blocks.ts";
import { f16ToF32, f32ToF16 } from "../model/dtype.ts";
import { ffnDelta } from "../model/forward.ts";
import { tensor } from "../model/tensor.ts";
import { rng } from "../numeric.ts";
import { type Gpu, readFloats, storage, upload } from "../webgpu/device.ts";
import { FfnKernels, GpuFfn, type HostFfn, type WeightType } from "../webgpu/ffn.ts";
import type { FfnRun } from "./shapes.ts";
import { type SequentialVsFused, streamingReadGBps, timePerRun } from "./timing.ts";

export interface FfnCase extends SequentialVsFused {
  sequential_gbps: number;
  fused_gbps: number;
  /** Fused kernel bandwidth over the adapter's measured streaming-read bandwidth. */
  fused_fraction_of_read_bw: number;
  sequential_rel_err: number;
  fused_rel_err: number;
}

export interface FfnBenchReport {
  adapter: string;
  source: string;
  weight_type: WeightType;
  d: number;
  n_per_layer: number[];
  k: number;
  streaming_read_gbps: number;
  cases: FfnCase[];
}

function toHost(b: FfnBlock): HostFfn {
  return {
    d: b.gate.shape[1],
    n: b.gate.shape[0],
    gain: b.norm,
    gate: b.gate.data,
    up: b.up.data,
    down: b.down.data,
  };
}

/** The weights the GPU really multiplies with (f16-rounded when stored as f16), for the reference. */
function asStored(b: FfnBlock, wt: WeightType): FfnBlock {
  if (wt === "f32") return b;
  const r = (t: typeof b.gate) => tensor(t.shape, f16ToF32(f32ToF16(t.data)));
  return { ...b, gate: r(b.gate), up: r(b.up), down: r(b.down) };
}

/** Float64 reference of a run, for the token rows `rows`: sequential layers or one parallel sum. */
function reference(
  blocks: FfnBlock[],
  x: Float32Array,
  d: number,
  rows: number[],
  eps: number,
  form: "sequential" | "parallel",
) {
  const xs = new Float64Array(rows.length * d);
  rows.forEach((t, i) => xs.set(x.subarray(t * d, (t + 1) * d), i * d));
  let cur = xs;
  if (form === "sequential") {
    for (const b of blocks) {
      const delta = ffnDelta(cur, b, rows.length, d, eps);
      cur = cur.map((v, i) => v + delta[i]);
    }
    return cur;
  }
  const out = Float64Array.from(xs);
  for (const b of blocks) {
    const delta = ffnDelta(xs, b, rows.length, d, eps);
    for (let i = 0; i < out.length; i++) out[i] += delta[i];
  }
  return out;
}

function relErr(got: Float32Array, want: Float64Array, rows: number[], d: number): number {
  let num = 0;
  let den = 0;
  rows.forEach((t, i) => {
    for (let j = 0; j < d; j++) {
      const g = got[t * d + j];
      if (!Number.isFinite(g)) num = Infinity;
      num += (g - want[i * d + j]) ** 2;
      den += want[i * d + j] ** 2;
    }
  });
  return Math.sqrt(num / den);
}

export interface FfnBenchOptions {
  tokens: number[];
  weightType: WeightType;
  /** Relative error above which a case fails its check and is not timed. */
  tolerance: number;
}

/**
 * Sequential (k FFNs, three dispatches each) against fused (one wide FFN, three dispatches), with
 * the same weights, checked against float64 and then timed with many runs per submit.
 */
export async function benchFfn(gpu: Gpu, run: FfnRun, opts: FfnBenchOptions): Promise<FfnBenchReport> {
  const kernels = await FfnKernels.create(gpu, opts.weightType);
  const { device } = gpu;
  const d = run.d;
  const maxT = Math.max(...opts.tokens);
  const sequential = run.blocks.map((b) => new GpuFfn(kernels, toHost(b), maxT, run.eps));
  const fused = new GpuFfn(kernels, toHost(fuseFfns(run.blocks)), maxT, run.eps);
  const stored = run.blocks.map((b) => asStored(b, opts.weightType));
  const bufA = storage(device, maxT * d * 4);
  const bufB = storage(device, maxT * d * 4);
  const cases: FfnCase[] = [];
  const random = rng(99);
  try {
    for (const tokens of opts.tokens) {
      const x = Float32Array.from({ length: tokens * d }, () => random() * 2 - 1);
      const xBuf = upload(device, x);
      const seqOut = run.blocks.length % 2 === 1 ? bufA : bufB;
      const encodeSeq = (pass: GPUComputePassEncoder) => {
        let src = xBuf;
        sequential.forEach((f, i) => {
          const dst = i % 2 === 0 ? bufA : bufB;
          f.encode(pass, src, dst, tokens, `${i}:${i === 0 ? "x" : i % 2 === 0 ? "b" : "a"}`);
          src = dst;
        });
      };
      const encodeFused = (pass: GPUComputePassEncoder) => fused.encode(pass, xBuf, bufA, tokens, "x");
      const rows = tokens <= 2 ? [...Array(tokens).keys()] : [0, tokens - 1];
      const check = async (
        encode: (p: GPUComputePassEncoder) => void,
        out: GPUBuffer,
        form: "sequential" | "parallel",
      ) => {
        device.queue.writeBuffer(out, 0, new Float32Array(tokens * d).fill(NaN));
        const enc = device.createCommandEncoder();
        const pass = enc.beginComputePass();
        encode(pass);
        pass.end();
        device.queue.submit([enc.finish()]);
        const got = await readFloats(device, out, tokens * d);
        const err = relErr(got, reference(stored, x, d, rows, run.eps, form), rows, d);
        if (!(err < opts.tolerance)) {
          throw new Error(
            `${form} FFN run, T=${tokens}: relative error ${err} vs float64 (tolerance ${opts.tolerance})`,
          );
        }
        return err;
      };
      const seqErr = await check(encodeSeq, seqOut, "sequential");
      const fusedErr = await check(encodeFused, bufA, "parallel");
      const [seq, fusedTime] = await timePerRun(device, [encodeSeq, encodeFused]);
      const seqMs = seq.median;
      const fusedMs = fusedTime.median;
      const bytes = fused.weightBytes;
      cases.push({
        tokens,
        sequential_ms: seqMs,
        fused_ms: fusedMs,
        sequential_range_ms: [seq.min, seq.max],
        fused_range_ms: [fusedTime.min, fusedTime.max],
        speedup: seqMs / fusedMs,
        sequential_gbps: bytes / seqMs / 1e6,
        fused_gbps: bytes / fusedMs / 1e6,
        fused_fraction_of_read_bw: 0,
        sequential_rel_err: seqErr,
        fused_rel_err: fusedErr,
      });
      xBuf.destroy();
    }
  } finally {
    sequential.forEach((f) => f.destroy());
    fused.destroy();
    bufA.destroy();
    bufB.destroy();
  }
  const peak = await streamingReadGBps(device);
  for (const c of cases) c.fused_fraction_of_read_bw = c.fused_gbps / peak;
  return {
    adapter: gpu.description,
    source: run.source,
    weight_type: opts.weightType,
    d,
    n_per_layer: run.blocks.map((b) => b.gate.shape[0]),
    k: run.blocks.length,
    streaming_read_gbps: peak,
    cases,
  };
}
