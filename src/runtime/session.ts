import { type DecoderGraph, pastKey, pastValue, presentKey, presentValue } from "../onnx/decoder.ts";
import { type Device, ort } from "./ort.ts";
import { yieldIfBusy } from "./yield.ts";

/** One sequence's attention cache: on the GPU between steps under WebGPU, in WASM memory otherwise. */
export interface KvCache {
  length: number;
  tensors: Map<string, ort.Tensor>;
}

export interface StepResult {
  /** [tokens, vocab] row-major: one row of next-token logits per input position. */
  logits: Float32Array;
  cache: KvCache;
}

/**
 * A decoder graph loaded into onnxruntime-web. onnxruntime-web sessions must not run concurrently,
 * so runs are chained: callers may interleave steps of many sequences, each with its own cache.
 */
export class ModelSession {
  private chain: Promise<unknown> = Promise.resolve();
  private released = false;

  private constructor(
    private readonly session: ort.InferenceSession,
    readonly graph: DecoderGraph,
    readonly device: Device,
    readonly vocabSize: number,
  ) {}

  static async create(graph: DecoderGraph, device: Device, vocabSize: number): Promise<ModelSession> {
    const preferred: Record<string, "gpu-buffer" | "cpu"> = { logits: "cpu" };
    if (device === "webgpu") {
      for (const { layer } of graph.cache) {
        preferred[presentKey(layer)] = "gpu-buffer";
        preferred[presentValue(layer)] = "gpu-buffer";
      }
    }
    const session = await ort.InferenceSession.create(graph.bytes, {
      executionProviders: [device],
      graphOptimizationLevel: "all",
      preferredOutputLocation: preferred,
      // Warnings such as "shape ops assigned to CPU" are expected for this graph; errors still show.
      logSeverityLevel: 3,
    });
    return new ModelSession(session, graph, device, vocabSize);
  }

  emptyCache(): KvCache {
    const tensors = new Map<string, ort.Tensor>();
    for (const { layer, kvHeads } of this.graph.cache) {
      const dims = [1, kvHeads, 0, this.graph.headDim];
      tensors.set(pastKey(layer), new ort.Tensor("float32", new Float32Array(0), dims));
      tensors.set(pastValue(layer), new ort.Tensor("float32", new Float32Array(0), dims));
    }
    return { length: 0, tensors };
  }

  /** Runs `ids` after the cached prefix; the old cache is consumed and must not be used again. */
  step(ids: number[], cache: KvCache): Promise<StepResult> {
    const run = this.chain.then(() => this.runStep(ids, cache));
    this.chain = run.catch(() => {});
    return run;
  }

  private async runStep(ids: number[], cache: KvCache): Promise<StepResult> {
    await yieldIfBusy();
    if (this.released) throw new Error("session was released");
    const t = ids.length;
    const total = cache.length + t;
    const feeds: Record<string, ort.Tensor> = {
      input_ids: new ort.Tensor("int64", BigInt64Array.from(ids, BigInt), [1, t]),
      attention_mask: new ort.Tensor("int64", new BigInt64Array(total).fill(1n), [1, total]),
      position_ids: new ort.Tensor(
        "int64",
        BigInt64Array.from({ length: t }, (_, i) => BigInt(cache.length + i)),
        [1, t],
      ),
    };
    for (const [name, tensor] of cache.tensors) feeds[name] = tensor;
    const out = await this.session.run(feeds);
    disposeCache(cache);
    const tensors = new Map<string, ort.Tensor>();
    for (const { layer } of this.graph.cache) {
      tensors.set(pastKey(layer), out[presentKey(layer)]);
      tensors.set(pastValue(layer), out[presentValue(layer)]);
    }
    const logits = (await out.logits.getData()) as Float32Array;
    return { logits, cache: { length: total, tensors } };
  }

  /** Waits for runs in flight, then frees the session's memory (GPU buffers included). */
  async release(): Promise<void> {
    this.released = true;
    await this.chain;
    await this.session.release();
  }
}

/** Frees GPU-resident cache tensors; CPU ones are left to the garbage collector. */
export function disposeCache(cache: KvCache): void {
  for (const t of cache.tensors.values()) {
    if (t.location === "gpu-buffer") t.dispose();
  }
  cache.tensors.clear();
}
