/**
 * What this process asks of WebGPU, counted: every call below, onnxruntime's included, goes through
 * these prototypes. A benchmark installs the counters around the code it measures and reads them
 * per step; `submitMs` is the time spent inside `queue.submit`, which a software adapter (lavapipe)
 * spends running the kernels, so host time is a step's wall time less it.
 */
export interface GpuCounts {
  dispatches: number;
  submits: number;
  readbacks: number;
  bindGroups: number;
  writes: number;
  submitMs: number;
}

const zero = (): GpuCounts => ({
  dispatches: 0,
  submits: 0,
  readbacks: 0,
  bindGroups: 0,
  writes: 0,
  submitMs: 0,
});

export class GpuCounters {
  counts: GpuCounts = zero();
  private readonly restore: (() => void)[] = [];

  /** Starts counting; `uninstall` puts the prototypes back. */
  install(): void {
    const c = () => this.counts;
    this.wrap(GPUComputePassEncoder.prototype, "dispatchWorkgroups", () => c().dispatches++);
    this.wrap(GPUBuffer.prototype, "mapAsync", () => c().readbacks++);
    this.wrap(GPUDevice.prototype, "createBindGroup", () => c().bindGroups++);
    this.wrap(GPUQueue.prototype, "writeBuffer", () => c().writes++);
    const submit = GPUQueue.prototype.submit;
    GPUQueue.prototype.submit = function (this: GPUQueue, ...args: Parameters<GPUQueue["submit"]>) {
      const t0 = performance.now();
      try {
        return submit.apply(this, args);
      } finally {
        c().submits++;
        c().submitMs += performance.now() - t0;
      }
    };
    this.restore.push(() => (GPUQueue.prototype.submit = submit));
  }

  reset(): GpuCounts {
    const was = this.counts;
    this.counts = zero();
    return was;
  }

  uninstall(): void {
    for (const undo of this.restore.splice(0).reverse()) undo();
  }

  // deno-lint-ignore no-explicit-any
  private wrap(proto: any, name: string, count: () => void): void {
    const original = proto[name];
    proto[name] = function (this: unknown, ...args: unknown[]) {
      count();
      return original.apply(this, args);
    };
    this.restore.push(() => (proto[name] = original));
  }
}

/**
 * GPU time between two points of the queue, by timestamp queries written from empty compute passes:
 * `mark()` before and after a step, `read()` once at the end. The span covers the step's commands
 * from the first one's start to the last one's end, including any wait for the host between them.
 */
export class GpuTimestamps {
  private readonly set: GPUQuerySet;
  private used = 0;

  constructor(private readonly device: GPUDevice, private readonly capacity: number) {
    this.set = device.createQuerySet({ type: "timestamp", count: capacity });
  }

  static available(device: GPUDevice): boolean {
    return device.features.has("timestamp-query");
  }

  mark(): void {
    if (this.used >= this.capacity) throw new Error("GpuTimestamps: no query left");
    const enc = this.device.createCommandEncoder();
    enc.beginComputePass({ timestampWrites: { querySet: this.set, beginningOfPassWriteIndex: this.used++ } })
      .end();
    this.device.queue.submit([enc.finish()]);
  }

  /** Milliseconds between consecutive pairs of marks: (0, 1), (2, 3), ... */
  async read(): Promise<number[]> {
    const bytes = this.used * 8;
    const usage = GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC;
    const resolved = this.device.createBuffer({ size: Math.max(8, bytes), usage });
    const staging = this.device.createBuffer({
      size: Math.max(8, bytes),
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
    const enc = this.device.createCommandEncoder();
    enc.resolveQuerySet(this.set, 0, this.used, resolved, 0);
    enc.copyBufferToBuffer(resolved, 0, staging, 0, bytes);
    this.device.queue.submit([enc.finish()]);
    try {
      await staging.mapAsync(GPUMapMode.READ);
      const t = new BigUint64Array(staging.getMappedRange().slice(0));
      const spans: number[] = [];
      for (let i = 0; i + 1 < this.used; i += 2) spans.push(Number(t[i + 1] - t[i]) / 1e6);
      return spans;
    } finally {
      resolved.destroy();
      staging.destroy();
    }
  }

  destroy(): void {
    this.set.destroy();
  }
}
