import type { Block } from "../model/blocks.ts";
import type { Checkpoint } from "../model/checkpoint.ts";
import {
  buildDecoderGraph,
  type DecoderGraph,
  pastKey,
  pastValue,
  presentKey,
  presentValue,
} from "../onnx/decoder.ts";
import { type Backend, createSession, ort, type OrtApi, runtimeFor } from "./ort.ts";
import { type BatchCache, disposeBatch, packRows, type RowSource } from "./kv_batch.ts";
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

/** A step whose logits stay where the session left them: in a GPU buffer under WebGPU. */
export interface TensorStepResult {
  /** [1, tokens, vocab]; the caller disposes it. */
  logits: ort.Tensor;
  cache: KvCache;
}

/** Step input: token ids from the host, or one id already on the GPU (an int64 written by a kernel). */
export type StepInput = number[] | GPUBuffer;

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
    readonly device: Backend,
    readonly vocabSize: number,
    private readonly rt: OrtApi,
  ) {}

  static async create(graph: DecoderGraph, device: Backend, vocabSize: number): Promise<ModelSession> {
    const rt = await runtimeFor(device);
    const preferred: Record<string, "gpu-buffer" | "cpu"> = {
      logits: device === "webgpu" ? "gpu-buffer" : "cpu",
    };
    if (device === "webgpu") {
      for (const { layer } of graph.cache) {
        preferred[presentKey(layer)] = "gpu-buffer";
        preferred[presentValue(layer)] = "gpu-buffer";
      }
    }
    const session = await createSession(device, graph.model, {
      executionProviders: [device === "native" ? "cpu" : device],
      // One thread, like the WASM build under Deno: the comparison is of the kernels, not of cores.
      ...(device === "native" ? { intraOpNumThreads: 1, interOpNumThreads: 1 } : {}),
      graphOptimizationLevel: "all",
      preferredOutputLocation: preferred,
      // Warnings such as "shape ops assigned to CPU" are expected for this graph; errors still show.
      logSeverityLevel: 3,
    });
    return new ModelSession(session, graph, device, vocabSize, rt);
  }

  emptyCache(): KvCache {
    return { length: 0, tensors: emptyPast(this.rt, this.graph) };
  }

  /** Runs `ids` after the cached prefix; the old cache is consumed and must not be used again. */
  async step(ids: number[], cache: KvCache): Promise<StepResult> {
    const r = await this.stepTensor(ids, cache);
    // Under WebGPU this download is the step's one readback (~11 ms under Deno).
    const logits = (await r.logits.getData(true)) as Float32Array;
    return { logits, cache: r.cache };
  }

  /** Logits [tokens, vocab] of a whole sequence from an empty cache (scoring a window); the cache is freed. */
  async logitsOf(ids: number[]): Promise<Float32Array> {
    const { logits, cache } = await this.step(ids, this.emptyCache());
    disposeCache(cache);
    return logits;
  }

  /** Like `step`, but leaves the logits in place (a GPU buffer under WebGPU) for on-device sampling. */
  stepTensor(input: StepInput, cache: KvCache): Promise<TensorStepResult> {
    const run = this.chain.then(() => this.runStep(input, cache));
    this.chain = run.catch(() => {});
    return run;
  }

  /** The WebGPU device onnxruntime runs on, for kernels that read its buffers. */
  async gpuDevice(): Promise<GPUDevice> {
    if (this.device !== "webgpu") throw new Error("not a WebGPU session");
    return await ort.env.webgpu.device as GPUDevice;
  }

  /**
   * One decode step of several sequences at once: `ids[b]` follows row b of `cache` (see BatchCache),
   * each at its own position, the padding masked. The old cache is consumed; the new one has every
   * row one position longer, in the same layout.
   */
  decodeBatch(ids: number[], cache: BatchCache): Promise<{ logits: Float32Array; cache: BatchCache }> {
    const run = this.chain.then(async () => {
      const rows = ids.length;
      const width = cache.width + 1;
      const mask = new BigInt64Array(rows * width);
      cache.lengths.forEach((len, b) => mask.fill(1n, b * width + (width - len - 1), (b + 1) * width));
      const out = await this.run({
        input_ids: new this.rt.Tensor("int64", BigInt64Array.from(ids, BigInt), [rows, 1]),
        attention_mask: new this.rt.Tensor("int64", mask, [rows, width]),
        position_ids: new this.rt.Tensor("int64", BigInt64Array.from(cache.lengths, BigInt), [rows, 1]),
      }, cache.tensors);
      disposeBatch(cache);
      const logits = (await out.logits.getData(true)) as Float32Array;
      return {
        logits,
        cache: { width, lengths: cache.lengths.map((l) => l + 1), tensors: this.presents(out) },
      };
    });
    this.chain = run.catch(() => {});
    return run;
  }

  /** A batch cache of `sources`' rows (see kv_batch.ts packRows), in this session's tensors. */
  packRows(sources: RowSource[]): Promise<BatchCache> {
    return packRows(this.rt, this.graph, sources);
  }

  private async run(
    feeds: Record<string, ort.Tensor>,
    cache: Map<string, ort.Tensor>,
  ): Promise<ort.InferenceSession.OnnxValueMapType> {
    await yieldIfBusy();
    if (this.released) throw new Error("session was released");
    for (const [name, tensor] of cache) feeds[name] = tensor;
    return await this.session.run(feeds);
  }

  /** The step's present K/V, renamed as the next step's past. */
  private presents(out: ort.InferenceSession.OnnxValueMapType): Map<string, ort.Tensor> {
    const tensors = new Map<string, ort.Tensor>();
    for (const { layer } of this.graph.cache) {
      tensors.set(pastKey(layer), out[presentKey(layer)]);
      tensors.set(pastValue(layer), out[presentValue(layer)]);
    }
    return tensors;
  }

  private async runStep(input: StepInput, cache: KvCache): Promise<TensorStepResult> {
    const t = Array.isArray(input) ? input.length : 1;
    const total = cache.length + t;
    const out = await this.run({
      input_ids: Array.isArray(input)
        ? new this.rt.Tensor("int64", BigInt64Array.from(input, BigInt), [1, t])
        : ort.Tensor.fromGpuBuffer(input, { dataType: "int64", dims: [1, 1] }),
      ...positionFeeds(this.rt, t, cache.length),
    }, cache.tensors);
    disposeCache(cache);
    return { logits: out.logits, cache: { length: total, tensors: this.presents(out) } };
  }

  /** Waits for runs in flight, then frees the session's memory (GPU buffers included). */
  async release(): Promise<void> {
    this.released = true;
    await this.chain;
    await this.session.release();
  }
}

/** Empty past K/V for each cached layer of a decoder graph: what a sequence starts from. */
export function emptyPast(
  rt: OrtApi,
  graph: Pick<DecoderGraph, "cache" | "headDim" | "floatType">,
): Map<string, ort.Tensor> {
  const tensors = new Map<string, ort.Tensor>();
  for (const { layer, kvHeads } of graph.cache) {
    const dims = [1, kvHeads, 0, graph.headDim];
    const empty = () =>
      graph.floatType === "float16"
        ? new rt.Tensor("float16", new Uint16Array(0), dims)
        : new rt.Tensor("float32", new Float32Array(0), dims);
    tensors.set(pastKey(layer), empty());
    tensors.set(pastValue(layer), empty());
  }
  return tensors;
}

/** The attention mask and position ids of t new tokens after `past` cached ones, one sequence. */
export function positionFeeds(rt: OrtApi, t: number, past: number): Record<string, ort.Tensor> {
  const total = past + t;
  return {
    attention_mask: new rt.Tensor("int64", new BigInt64Array(total).fill(1n), [1, total]),
    position_ids: new rt.Tensor("int64", BigInt64Array.from({ length: t }, (_, i) => BigInt(past + i)), [
      1,
      t,
    ]),
  };
}

/** A single sequence's cache seen as a batch of one row. */
export function asBatch(cache: KvCache): BatchCache {
  return { width: cache.length, lengths: [cache.length], tensors: cache.tensors };
}

/** Frees GPU-resident cache tensors; CPU ones are left to the garbage collector. */
export function disposeCache(cache: KvCache): void {
  for (const t of cache.tensors.values()) {
    if (t.location === "gpu-buffer") t.dispose();
  }
  cache.tensors.clear();
}

/**
 * Runs `use` on an fp32 session of a block list (a candidate plan being scored, a fit being measured),
 * WASM unless told otherwise, and frees the session however `use` ends.
 */
export async function withScoringSession<T>(
  ckpt: Checkpoint,
  blocks: Block[],
  use: (session: ModelSession) => Promise<T>,
  device: Backend = "wasm",
): Promise<T> {
  const session = await ModelSession.create(buildDecoderGraph(ckpt, blocks), device, ckpt.config.vocabSize);
  try {
    return await use(session);
  } finally {
    await session.release();
  }
}
