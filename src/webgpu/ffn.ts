import { f32ToF16 } from "../model/dtype.ts";
import { type Gpu, storage, upload } from "./device.ts";
import { compileKernel } from "./shader.ts";

export type WeightType = "f32" | "f16";

/** The kernels are written once over a weight type WT; f16 needs the extension enabled. */
const typed = (wt: WeightType) => (source: string) => {
  const body = source.replaceAll("WT", wt);
  return wt === "f16" ? `enable f16;\n${body}` : body;
};

/** The compiled pipelines for one weight type; shared by every FFN on the device. */
export class FfnKernels {
  private constructor(
    readonly gpu: Gpu,
    readonly weightType: WeightType,
    readonly rmsnorm: GPUComputePipeline,
    readonly gateUpGemv: GPUComputePipeline,
    readonly gateUpGemm: GPUComputePipeline,
    readonly downGemv: GPUComputePipeline,
    readonly downGemm: GPUComputePipeline,
  ) {}

  static async create(gpu: Gpu, weightType: WeightType): Promise<FfnKernels> {
    if (weightType === "f16" && !gpu.hasF16) throw new Error("the adapter has no shader-f16");
    const { device } = gpu;
    const module = (name: string) => compileKernel(device, name, typed(weightType));
    const norm = await module("rmsnorm.wgsl");
    const gateUp = await module("gate_up.wgsl");
    const down = await module("down.wgsl");
    const pipe = (m: GPUShaderModule, entryPoint: string) =>
      device.createComputePipeline({ layout: "auto", compute: { module: m, entryPoint } });
    return new FfnKernels(
      gpu,
      weightType,
      pipe(norm, "main"),
      pipe(gateUp, "gemv"),
      pipe(gateUp, "gemm"),
      pipe(down, "gemv"),
      pipe(down, "gemm"),
    );
  }
}

/** One SwiGLU FFN on the host side: an unfused layer, or a fused group (gain null, widths summed). */
export interface HostFfn {
  d: number;
  n: number;
  /** RMSNorm gain; null means unit gain (gains folded into gate/up). */
  gain: Float32Array | null;
  /** [n, d] */
  gate: Float32Array;
  /** [n, d] */
  up: Float32Array;
  /** [d, n] */
  down: Float32Array;
}

/** Most dispatches have at most this many workgroups along x; larger grids wrap into y. */
const MAX_X = 32768;

/**
 * An FFN resident on the GPU, computing out = x + FFN(norm(x)) for up to `maxTokens` tokens in three
 * dispatches: RMSNorm, gate+up with the SwiGLU epilogue, down with the residual add.
 */
export class GpuFfn {
  private readonly gain: GPUBuffer;
  private readonly gate: GPUBuffer;
  private readonly up: GPUBuffer;
  private readonly down: GPUBuffer;
  private readonly normed: GPUBuffer;
  private readonly hidden: GPUBuffer;
  private readonly params = new Map<number, GPUBuffer[]>();
  private readonly groups = new Map<string, GPUBindGroup[]>();
  readonly weightBytes: number;

  constructor(
    private readonly k: FfnKernels,
    readonly w: HostFfn,
    readonly maxTokens: number,
    readonly eps: number,
  ) {
    if (w.d % 4 !== 0 || w.n % 4 !== 0) {
      throw new Error(`FFN dims must be multiples of 4 (d=${w.d}, n=${w.n})`);
    }
    const dev = k.gpu.device;
    const weights = (a: Float32Array) => upload(dev, k.weightType === "f16" ? f32ToF16(a) : a);
    this.gain = upload(dev, w.gain ?? new Float32Array(w.d).fill(1));
    this.gate = weights(w.gate);
    this.up = weights(w.up);
    this.down = weights(w.down);
    this.normed = storage(dev, maxTokens * w.d * 4);
    this.hidden = storage(dev, maxTokens * w.n * 4);
    this.weightBytes = 3 * w.n * w.d * (k.weightType === "f16" ? 2 : 4);
  }

  private paramsFor(tokens: number): GPUBuffer[] {
    let p = this.params.get(tokens);
    if (!p) {
      const dev = this.k.gpu.device;
      const { d, n } = this.w;
      const norm = new ArrayBuffer(16);
      new Uint32Array(norm, 0, 2).set([d, tokens]);
      new Float32Array(norm, 8, 1)[0] = this.eps;
      const rowsX = Math.min(n, MAX_X);
      p = [
        upload(dev, new Uint8Array(norm), "uniform"),
        upload(dev, new Uint32Array([d, n, tokens, rowsX]), "uniform"),
        upload(dev, new Uint32Array([n, d, tokens, 0]), "uniform"),
      ];
      this.params.set(tokens, p);
    }
    return p;
  }

  private bindGroups(x: GPUBuffer, out: GPUBuffer, tokens: number, key: string): GPUBindGroup[] {
    const hit = this.groups.get(key);
    if (hit) return hit;
    const dev = this.k.gpu.device;
    const [pn, pg, pd] = this.paramsFor(tokens);
    const gemv = tokens === 1;
    const entries = (bufs: GPUBuffer[]) => bufs.map((buffer, binding) => ({ binding, resource: { buffer } }));
    const gu = gemv ? this.k.gateUpGemv : this.k.gateUpGemm;
    const dn = gemv ? this.k.downGemv : this.k.downGemm;
    const groups = [
      dev.createBindGroup({
        layout: this.k.rmsnorm.getBindGroupLayout(0),
        entries: entries([x, this.gain, this.normed, pn]),
      }),
      dev.createBindGroup({
        layout: gu.getBindGroupLayout(0),
        entries: entries([this.normed, this.gate, this.up, this.hidden, pg]),
      }),
      dev.createBindGroup({
        layout: dn.getBindGroupLayout(0),
        entries: entries([this.hidden, this.down, x, out, pd]),
      }),
    ];
    this.groups.set(key, groups);
    return groups;
  }

  /** Records out = x + FFN(norm(x)) into `pass`; `key` names the (x, out) pair for bind-group reuse. */
  encode(pass: GPUComputePassEncoder, x: GPUBuffer, out: GPUBuffer, tokens: number, key: string): void {
    if (tokens > this.maxTokens) throw new Error(`${tokens} tokens > maxTokens ${this.maxTokens}`);
    const [gn, gg, gd] = this.bindGroups(x, out, tokens, `${key}:${tokens}`);
    const { d, n } = this.w;
    pass.setPipeline(this.k.rmsnorm);
    pass.setBindGroup(0, gn);
    pass.dispatchWorkgroups(tokens);
    if (tokens === 1) {
      pass.setPipeline(this.k.gateUpGemv);
      pass.setBindGroup(0, gg);
      pass.dispatchWorkgroups(Math.min(n, MAX_X), Math.ceil(n / MAX_X));
      pass.setPipeline(this.k.downGemv);
      pass.setBindGroup(0, gd);
      pass.dispatchWorkgroups(d);
    } else {
      pass.setPipeline(this.k.gateUpGemm);
      pass.setBindGroup(0, gg);
      pass.dispatchWorkgroups(Math.ceil(n / 16), Math.ceil(tokens / 16));
      pass.setPipeline(this.k.downGemm);
      pass.setBindGroup(0, gd);
      pass.dispatchWorkgroups(Math.ceil(d / 16), Math.ceil(tokens / 16));
    }
  }

  destroy(): void {
    for (const b of [this.gain, this.gate, this.up, this.down, this.normed, this.hidden]) b.destroy();
    for (const ps of this.params.values()) ps.forEach((b) => b.destroy());
  }
}
