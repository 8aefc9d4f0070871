import { GraphBuilder } from "../onnx/builder.ts";
import { createSession, ort } from "./ort.ts";

/**
 * GPU buffers that onnxruntime itself allocates, each `bytes` long (rounded up to whole words), to
 * be viewed with any type and shape through `Tensor.fromGpuBuffer`.
 *
 * Why not buffers of our own: onnxruntime-web 1.30 registers a caller's GPU buffer with its WebGPU
 * runtime for the length of one `run` and releases the registration after it, so the next run gets
 * a new handle. A graph-captured session binds its inputs and outputs once, at its first run, and
 * from the second run on hands back outputs under the first run's handles, which no longer resolve:
 * the run fails ("Cannot set properties of undefined (setting 'Symbol(gpuBufferMetadata)')"), or not,
 * depending on whether the handle allocator happens to reuse the same numbers (measured on lavapipe:
 * the tiny-nas decoder failed, subsets of its layers did not). Buffers that onnxruntime allocated as
 * outputs stay registered for good, so their handles never change.
 */
export class OrtBuffers {
  private constructor(
    private readonly session: ort.InferenceSession,
    private readonly tensors: ort.Tensor[],
  ) {}

  static async allocate(bytes: number[]): Promise<OrtBuffers> {
    const g = new GraphBuilder();
    const zero = g.scalar(0);
    bytes.forEach((b, i) => {
      const words = Math.max(1, Math.ceil(b / 4));
      g.node("Expand", [zero, g.ints([words])], {}, [`b${i}`]);
      g.output(`b${i}`, "float32", [words]);
    });
    const session = await createSession("webgpu", g.encode("fusedge_buffers"), {
      executionProviders: [{ name: "webgpu" }],
      preferredOutputLocation: "gpu-buffer",
      // Folded as a constant, a model's worth of zeros would be built in the WASM heap; on the
      // CPU provider the buffers would be made there and copied. Neither: made on the GPU.
      graphOptimizationLevel: "disabled",
      extra: { session: { disable_cpu_ep_fallback: "1" } },
      logSeverityLevel: 3,
    });
    const out = await session.run({});
    return new OrtBuffers(session, bytes.map((_, i) => out[`b${i}`]));
  }

  buffer(i: number): GPUBuffer {
    return this.tensors[i].gpuBuffer as GPUBuffer;
  }

  async release(): Promise<void> {
    for (const t of this.tensors) t.dispose();
    await this.session.release();
  }
}
