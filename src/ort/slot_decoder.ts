import { type DecoderGraph, pastKey, pastValue, presentKey, presentValue } from "../onnx/decoder.ts";
import { readWeight, type WeightElem } from "../onnx/weight_cache.ts";
import { GpuSampler } from "./gpu_sampler.ts";
import { createSession, ort } from "./ort.ts";
import { OrtBuffers } from "./ort_buffers.ts";
import { lengthFeeds, logitPositions, type LogitRows } from "./session.ts";
import { yieldIfBusy } from "../yield.ts";

/** How a plan instance's KV cache is laid out on the GPU, and which batch sizes are captured. */
export interface SlotLayout {
  /** Sequences that decode at once: one slot each. */
  slots: number;
  /** Tokens one slot holds. */
  capacity: number;
  /** Batch sizes a decode step runs at (the smallest that covers the highest busy slot). */
  buckets: number[];
  /** Record each batch size's step once and replay it (onnxruntime's graph capture). */
  capture: boolean;
}

/** The batch sizes worth a captured graph of their own: powers of two up to the slots, and the slots. */
export function bucketsFor(slots: number): number[] {
  const out: number[] = [];
  for (let b = 1; b < slots; b *= 2) out.push(b);
  return [...out, slots];
}

/** WebGPU graphs never take int8 weights (the integer path is WASM's and native's). */
type Elem = Exclude<WeightElem, "int8"> | "int32";

interface KvPair {
  key: GPUBuffer;
  value: GPUBuffer;
}

/**
 * A decoder graph on WebGPU with a static KV cache. Every layer's keys and values live in one
 * preallocated buffer of `slots` rows of `capacity` positions; GroupQueryAttention reads and writes
 * them in place (past and present bound to the same buffer), each row at its own length. A sequence
 * is prefilled into a one-row scratch cache, then copied GPU-to-GPU into a slot; a decode step runs
 * every busy slot at once, its input ids written by the GPU sampler, so nothing is read back or
 * uploaded but a few lengths. The weights are graph inputs bound to buffers uploaded once, so the
 * prefill session and the captured decode session of each batch size share one copy.
 */
export class SlotDecoder {
  /** The captured decode session of each batch size, once made; and those that have run once (bound). */
  private readonly decodeSessions = new Map<number, ort.InferenceSession>();
  private readonly captured = new Set<number>();
  private readonly bucketIo = new Map<number, ReturnType<SlotDecoder["kv"]>>();

  /** The step graph's session when steps are not captured and it is not the prefill's graph. */
  private uncaptured: ort.InferenceSession | null = null;

  private constructor(
    readonly graph: DecoderGraph,
    private readonly step: DecoderGraph,
    readonly vocab: number,
    readonly layout: SlotLayout,
    private readonly device: GPUDevice,
    private readonly buffers: OrtBuffers,
    private readonly prefillSession: ort.InferenceSession,
    private readonly weights: Record<string, ort.Tensor>,
    private readonly stepWeights: Record<string, ort.Tensor>,
    private readonly pool: Map<number, KvPair>,
    private readonly scratch: Map<number, KvPair>,
    private readonly io: {
      ids: GPUBuffer;
      seqlens: GPUBuffer;
      total: GPUBuffer;
      positions: GPUBuffer;
      logits: GPUBuffer;
      prefillLogits: GPUBuffer;
    },
    readonly sampler: GpuSampler,
  ) {}

  /** The buffer prefill leaves its last position's logits in: [1, vocab] f32, for the sampler. */
  get prefillLogits(): GPUBuffer {
    return this.io.prefillLogits;
  }

  /** The buffer a decode step leaves its logits in: row b is slot b's, [slots, vocab] f32. */
  get decodeLogits(): GPUBuffer {
    return this.io.logits;
  }

  /**
   * `step` is the graph a decode step runs: `graph` itself, or its step form (src/onnx/decoder.ts
   * DecoderLayout.step), whose weight inputs are the same bytes in other shapes.
   */
  static async create(
    graph: DecoderGraph,
    step: DecoderGraph,
    vocab: number,
    layout: SlotLayout,
  ): Promise<SlotDecoder> {
    const { slots, capacity } = layout;
    const elem = graph.floatType === "float16" ? 2 : 4;
    const hd = graph.headDim;
    const sizes: number[] = [];
    const weightNames = [...graph.model.weightInputs.keys()];
    for (const w of graph.model.weightInputs.values()) sizes.push(w.byteLength);
    for (const { kvHeads } of graph.cache) {
      const row = kvHeads * capacity * hd * elem;
      sizes.push(slots * row, slots * row, row, row);
    }
    sizes.push(slots * 4, slots * 4, 4, slots * 4, slots * vocab * 4, vocab * 4);
    const buffers = await OrtBuffers.allocate(sizes);
    const device = await ort.env.webgpu.device as GPUDevice;
    let at = 0;
    const weights: Record<string, ort.Tensor> = {};
    const stepWeights: Record<string, ort.Tensor> = {};
    for (const name of weightNames) {
      const w = graph.model.weightInputs.get(name)!;
      const buffer = buffers.buffer(at++);
      writePadded(device, buffer, readWeight(w));
      weights[name] = view(buffer, w.elem as Elem, w.dims);
      const s = step.model.weightInputs.get(name)!;
      stepWeights[name] = s === w ? weights[name] : view(buffer, s.elem as Elem, s.dims);
    }
    const pool = new Map<number, KvPair>();
    const scratch = new Map<number, KvPair>();
    for (const { layer } of graph.cache) {
      pool.set(layer, { key: buffers.buffer(at++), value: buffers.buffer(at++) });
      scratch.set(layer, { key: buffers.buffer(at++), value: buffers.buffer(at++) });
    }
    const [ids, seqlens, total, positions, logits, prefillLogits] = Array.from(
      { length: 6 },
      () => buffers.buffer(at++),
    );
    device.queue.writeBuffer(positions, 0, Int32Array.from({ length: slots }, (_, i) => i));
    const prefillSession = await createSession("webgpu", graph.model, SlotDecoder.options(false));
    const sampler = await GpuSampler.create(device, vocab, slots, ids);
    const decoder = new SlotDecoder(
      graph,
      step,
      vocab,
      layout,
      device,
      buffers,
      prefillSession,
      weights,
      stepWeights,
      pool,
      scratch,
      { ids, seqlens, total, positions, logits, prefillLogits },
      sampler,
    );
    return decoder;
  }

  /**
   * Creates and records the captured step of every batch size now, on an empty cache (each row
   * writes position 0 of a slot nothing lives in yet), so that serving never waits for one; without
   * this, each is made at its first use.
   */
  async warm(): Promise<void> {
    if (!this.layout.capture) return;
    for (const b of this.layout.buckets) if (!this.decodeSessions.has(b)) await this.decode(new Map(), b);
  }

  /**
   * Provider options in the object form (the string form drops them, enableGraphCapture among them),
   * and no fallback to the CPU provider: a node placed there would cost a copy each way every step
   * (and break capture), so a graph with one fails to load, naming it.
   */
  private static options(capture: boolean): ort.InferenceSession.SessionOptions {
    return {
      executionProviders: [{ name: "webgpu" }],
      graphOptimizationLevel: "all",
      enableGraphCapture: capture,
      preferredOutputLocation: "gpu-buffer",
      logSeverityLevel: 3,
      extra: { session: { disable_cpu_ep_fallback: "1" } },
    };
  }

  private kvView(buffer: GPUBuffer, rows: number, kvHeads: number): ort.Tensor {
    const dims = [rows, kvHeads, this.layout.capacity, this.graph.headDim];
    return view(buffer, this.graph.floatType, dims);
  }

  /** Feeds and fetches of the KV buffers: past and present the same buffer, `rows` rows of it. */
  private kv(which: Map<number, KvPair>, rows: number) {
    const feeds: Record<string, ort.Tensor> = {};
    const fetches: Record<string, ort.Tensor> = {};
    for (const { layer, kvHeads } of this.graph.cache) {
      const { key, value } = which.get(layer)!;
      feeds[pastKey(layer)] = this.kvView(key, rows, kvHeads);
      feeds[pastValue(layer)] = this.kvView(value, rows, kvHeads);
      fetches[presentKey(layer)] = this.kvView(key, rows, kvHeads);
      fetches[presentValue(layer)] = this.kvView(value, rows, kvHeads);
    }
    return { feeds, fetches };
  }

  /**
   * Runs `ids` after the `past` tokens already in the scratch cache, whose keys and values it adds.
   * The last position's logits go to `prefillLogits`; with `rows` "all", every position's logits are
   * also returned, read back (prompt log-probabilities).
   */
  async prefill(ids: number[], past: number, rows: LogitRows = "last"): Promise<Float32Array | null> {
    const t = ids.length;
    if (past + t > this.layout.capacity) {
      throw new Error(`${past + t} tokens do not fit a KV slot of ${this.layout.capacity}`);
    }
    const { feeds, fetches } = this.kv(this.scratch, 1);
    const rt = { Tensor: ort.Tensor, InferenceSession: ort.InferenceSession };
    Object.assign(feeds, this.weights, {
      input_ids: new ort.Tensor("int32", Int32Array.from(ids), [1, t]),
      ...lengthFeeds(rt, [past + t]),
      logit_positions: logitPositions(rt, 1, t, rows),
    });
    // Named without a tensor, an output is allocated by onnxruntime (and must be asked for by name).
    const outputs: Record<string, ort.Tensor | null> = {
      ...fetches,
      logits: rows === "last" ? view(this.io.prefillLogits, "float32", [1, 1, this.vocab]) : null,
    };
    await yieldIfBusy();
    const out = await this.prefillSession.run(feeds, outputs);
    if (rows === "last") return null;
    const logits = out.logits;
    try {
      const all = (await logits.getData()) as Float32Array<ArrayBuffer>;
      this.device.queue.writeBuffer(this.io.prefillLogits, 0, all, (t - 1) * this.vocab, this.vocab);
      return all;
    } finally {
      logits.dispose();
    }
  }

  /** The logits of every position of `ids` from an empty cache (scoring; not while serving). */
  async logitsOf(ids: number[]): Promise<Float32Array> {
    return (await this.prefill(ids, 0, "all"))!;
  }

  /** Copies positions [0, length) of every layer between the scratch cache and slot `slot`. */
  private copy(slot: number, length: number, toSlot: boolean): void {
    const enc = this.device.createCommandEncoder();
    const elem = this.graph.floatType === "float16" ? 2 : 4;
    const headBytes = this.layout.capacity * this.graph.headDim * elem;
    const bytes = length * this.graph.headDim * elem;
    for (const { layer, kvHeads } of this.graph.cache) {
      const s = this.scratch.get(layer)!;
      const p = this.pool.get(layer)!;
      for (const kind of ["key", "value"] as const) {
        for (let h = 0; h < kvHeads; h++) {
          const scratchAt = h * headBytes;
          const slotAt = (slot * kvHeads + h) * headBytes;
          if (toSlot) enc.copyBufferToBuffer(s[kind], scratchAt, p[kind], slotAt, bytes);
          else enc.copyBufferToBuffer(p[kind], slotAt, s[kind], scratchAt, bytes);
        }
      }
    }
    this.device.queue.submit([enc.finish()]);
  }

  /** The prefilled sequence joins the batch: the scratch cache's first `length` positions into a slot. */
  join(slot: number, length: number): void {
    if (length > 0) this.copy(slot, length, true);
  }

  /** A prompt starts from a slot's first `length` positions (a shared prefix): copied into the scratch. */
  loadPrefix(slot: number, length: number): void {
    if (length > 0) this.copy(slot, length, false);
  }

  /** A decode step's feeds and fetches at one batch size: views of fixed buffers, made once. */
  private decodeIo(bucket: number) {
    let io = this.bucketIo.get(bucket);
    if (!io) {
      io = this.kv(this.pool, bucket);
      Object.assign(io.feeds, this.stepWeights, {
        input_ids: view(this.io.ids, "int32", [bucket, 1]),
        seqlens_k: view(this.io.seqlens, "int32", [bucket]),
        total_sequence_length: view(this.io.total, "int32", []),
        logit_positions: view(this.io.positions, "int32", [bucket, 1]),
      });
      io.fetches.logits = view(this.io.logits, "float32", [bucket, 1, this.vocab]);
      this.bucketIo.set(bucket, io);
    }
    return io;
  }

  /** The batch size a step over slots [0, highest] runs at. */
  bucketFor(highest: number): number {
    return this.layout.buckets.find((b) => b > highest) ?? this.layout.slots;
  }

  /**
   * One decode step of every busy slot: `lengths` maps each to the tokens in its cache before the
   * step (its input id is already in place); the step runs at `bucket` rows, idle ones included
   * (they write position 0 of their slot, which holds nothing). Logits land in `decodeLogits`.
   */
  async decode(lengths: Map<number, number>, bucket: number): Promise<void> {
    const after = new Int32Array(bucket);
    for (const [slot, len] of lengths) after[slot] = len;
    const total = Math.max(0, ...after) + 1;
    this.device.queue.writeBuffer(this.io.seqlens, 0, after);
    this.device.queue.writeBuffer(this.io.total, 0, Int32Array.of(total));
    const { feeds, fetches } = this.decodeIo(bucket);
    await yieldIfBusy();
    if (!this.layout.capture) {
      if (this.step === this.graph) return void await this.prefillSession.run(feeds, fetches);
      this.uncaptured ??= await createSession("webgpu", this.step.model, SlotDecoder.options(false));
      await this.uncaptured.run(feeds, fetches);
      return;
    }
    let captured = this.decodeSessions.get(bucket);
    if (!captured) {
      captured = await createSession("webgpu", this.step.model, SlotDecoder.options(true));
      this.decodeSessions.set(bucket, captured);
    }
    // A captured session keeps the buffers it was bound to at its first run; later runs hand the
    // outputs back as new tensors over the same buffers, which only need releasing.
    const first = !this.captured.has(bucket);
    const out = await captured.run(feeds, first ? fetches : undefined);
    this.captured.add(bucket);
    if (!first) { for (const t of Object.values(out)) t.dispose(); }
  }

  async release(): Promise<void> {
    this.sampler.destroy();
    const sessions = [this.prefillSession, this.uncaptured, ...this.decodeSessions.values()];
    for (const s of sessions) await s?.release();
    await this.buffers.release();
  }
}

function view(buffer: GPUBuffer, elem: Elem, dims: number[]): ort.Tensor {
  return ort.Tensor.fromGpuBuffer(buffer, { dataType: elem, dims });
}

/** writeBuffer takes whole words: a weight of an odd number of halves is sent with a padding half. */
function writePadded(device: GPUDevice, buffer: GPUBuffer, bytes: Uint8Array): void {
  if (bytes.byteLength % 4 === 0) {
    device.queue.writeBuffer(buffer, 0, bytes as Uint8Array<ArrayBuffer>);
    return;
  }
  const padded = new Uint8Array(Math.ceil(bytes.byteLength / 4) * 4);
  padded.set(bytes);
  device.queue.writeBuffer(buffer, 0, padded);
}
