import { compileKernel } from "../webgpu/shader.ts";
import type { ModelSession } from "./session.ts";

/** How many tokens are generated between two readbacks of the token history. */
export const DEFAULT_READBACK_BATCH = 8;

export interface GpuPickerOptions {
  /** 0 for greedy. */
  temperature: number;
  seed: number;
  maxSteps: number;
}

/**
 * Chooses tokens on the GPU (kernels/argmax.wgsl) from logits onnxruntime left in a GPU buffer, and
 * writes each as the next step's int32 input_ids, so a decode step needs no readback at all. The ids
 * also go into a history buffer that the host reads back in batches, overlapped with decoding.
 */
export class GpuTokenPicker {
  private step = 0;
  private readonly group0: Map<GPUBuffer, GPUBindGroup> = new Map();

  private constructor(
    private readonly device: GPUDevice,
    private readonly pipeline: GPUComputePipeline,
    /** int32 [1, 1]: the id just chosen, as onnxruntime reads input_ids. */
    readonly nextIds: GPUBuffer,
    private readonly history: GPUBuffer,
    private readonly params: GPUBuffer,
    private readonly opts: GpuPickerOptions,
  ) {}

  static async create(session: ModelSession, opts: GpuPickerOptions): Promise<GpuTokenPicker> {
    const device = await session.gpuDevice();
    const module = await compileKernel(device, "argmax.wgsl");
    const pipeline = device.createComputePipeline({
      layout: "auto",
      compute: { module, entryPoint: "main" },
    });
    const usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
    return new GpuTokenPicker(
      device,
      pipeline,
      device.createBuffer({ size: 16, usage }),
      device.createBuffer({ size: Math.max(16, opts.maxSteps * 4), usage }),
      device.createBuffer({ size: 32, usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST }),
      opts,
    );
  }

  get steps(): number {
    return this.step;
  }

  /** Queues the choice of the next token from row `row` of a [1, T, vocab] logits buffer. */
  pick(logits: GPUBuffer, row: number, vocab: number): void {
    if (this.step >= this.opts.maxSteps) throw new Error("GpuTokenPicker: history is full");
    const params = new ArrayBuffer(32);
    const u = new Uint32Array(params);
    u.set([row * vocab, vocab, this.step, this.opts.seed >>> 0]);
    new Float32Array(params, 16, 1)[0] = this.opts.temperature > 0 ? 1 / this.opts.temperature : 1;
    u[5] = this.opts.temperature > 0 ? 1 : 0;
    this.device.queue.writeBuffer(this.params, 0, params);
    let group = this.group0.get(logits);
    if (!group) {
      group = this.device.createBindGroup({
        layout: this.pipeline.getBindGroupLayout(0),
        entries: [logits, this.nextIds, this.history, this.params].map((buffer, binding) => ({
          binding,
          resource: { buffer },
        })),
      });
      // Logits buffers come and go with each step: only the latest binding is worth keeping.
      this.group0.clear();
      this.group0.set(logits, group);
    }
    const enc = this.device.createCommandEncoder();
    const pass = enc.beginComputePass();
    pass.setPipeline(this.pipeline);
    pass.setBindGroup(0, group);
    pass.dispatchWorkgroups(1);
    pass.end();
    this.device.queue.submit([enc.finish()]);
    this.step++;
  }

  /** Starts reading ids [from, to) back; the promise settles after the GPU has produced them. */
  readBack(from: number, to: number): Promise<number[]> {
    const bytes = (to - from) * 4;
    const staging = this.device.createBuffer({
      size: Math.max(bytes, 4),
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
    const enc = this.device.createCommandEncoder();
    enc.copyBufferToBuffer(this.history, from * 4, staging, 0, bytes);
    this.device.queue.submit([enc.finish()]);
    return staging.mapAsync(GPUMapMode.READ).then(() => {
      const ids = Array.from(new Uint32Array(staging.getMappedRange().slice(0, bytes)));
      staging.unmap();
      staging.destroy();
      return ids;
    });
  }

  destroy(): void {
    this.nextIds.destroy();
    this.history.destroy();
    this.params.destroy();
  }
}
