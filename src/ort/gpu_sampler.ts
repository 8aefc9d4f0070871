import { compileKernel } from "../webgpu/shader.ts";
import { MAX_TOP_LOGPROBS, type Scored } from "../sampling/logprobs.ts";
import type { SamplingParams } from "../sampling/sampling.ts";

/** Tokens a slot's rings hold: the host reads a slot's tokens back before the GPU is this far ahead. */
export const RING = 64;

/** Words a ring entry of log-probabilities takes: the chosen token's, then 20 (id, logprob) pairs. */
const LP_STRIDE = 1 + 2 * MAX_TOP_LOGPROBS;
const ROW_BYTES = 48;
const PROMPT = 0x80000000;

/** One row to sample: where its logits are, which slot it decodes in, and its parameters. */
export interface SampleRow {
  /** Row of the logits buffer. */
  logitsRow: number;
  slot: number;
  /** The token's index in its sequence's output: its place in the slot's rings. */
  index: number;
  seed: number;
  params: SamplingParams;
  /** Alternatives whose log-probabilities to report; undefined when none were asked for. */
  logprobs?: number;
  /** Only the tokens of the slot's mask (setMask) may be chosen. */
  masked?: boolean;
}

/** Whether the penalties change anything: only then does the kernel read the slot's counts. */
export function hasPenalties(p: SamplingParams): boolean {
  return p.repetitionPenalty !== 1 || !!p.presencePenalty || !!p.frequencyPenalty;
}

/** What the host reads back: every slot's ring of token ids, and of log-probabilities when kept. */
export interface RingSnapshot {
  ids: Uint32Array;
  lp: Uint32Array | null;
}

/**
 * Chooses tokens on the GPU (kernels/sample.wgsl) from logits onnxruntime left in a GPU buffer, for
 * every sampling mode, and writes each where the next decode step reads its input ids; the ids (and
 * log-probabilities, when a row asks for them) land in per-slot rings that the host reads back in
 * batches, overlapped with decoding.
 */
export class GpuSampler {
  private readonly groups = new Map<GPUBuffer, GPUBindGroup>();

  private constructor(
    private readonly device: GPUDevice,
    private readonly pipeline: GPUComputePipeline,
    private readonly vocab: number,
    readonly slots: number,
    /** The next step's input ids, int32 [slots]: written here, read by onnxruntime. */
    private readonly ids: GPUBuffer,
    private readonly rows: GPUBuffer,
    private readonly counts: GPUBuffer,
    private readonly history: GPUBuffer,
    private readonly lp: GPUBuffer,
    private readonly consts: GPUBuffer,
    private readonly masks: GPUBuffer,
  ) {}

  static async create(device: GPUDevice, vocab: number, slots: number, ids: GPUBuffer): Promise<GpuSampler> {
    const module = await compileKernel(device, "sample.wgsl");
    const pipeline = device.createComputePipeline({
      layout: "auto",
      compute: { module, entryPoint: "main" },
    });
    const storage = (bytes: number) =>
      device.createBuffer({
        size: Math.max(16, Math.ceil(bytes / 16) * 16),
        usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
      });
    const consts = device.createBuffer({ size: 16, usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST });
    device.queue.writeBuffer(consts, 0, Uint32Array.of(vocab, RING, 0, 0));
    return new GpuSampler(
      device,
      pipeline,
      vocab,
      slots,
      ids,
      storage(slots * ROW_BYTES),
      storage(slots * vocab * 4),
      storage(slots * RING * 4),
      storage(slots * RING * LP_STRIDE * 4),
      consts,
      storage(slots * maskWords(vocab) * 4),
    );
  }

  /**
   * A new sequence in `slot`: its counts start from its prompt (the repetition penalty counts prompt
   * tokens), written only when its sampling has penalties (otherwise the kernel never reads them).
   */
  startSequence(slot: number, prompt: number[], params: SamplingParams): void {
    if (!hasPenalties(params)) return;
    const row = new Uint32Array(this.vocab);
    for (const id of prompt) row[id] = PROMPT;
    this.device.queue.writeBuffer(this.counts, slot * this.vocab * 4, row);
  }

  /**
   * The tokens a constrained sequence in `slot` may take next (a grammar's bitmask: bit i of word
   * i / 32 allows id i; ids past its words are not allowed), for the rows sampled after this call.
   */
  setMask(slot: number, bits: Int32Array): void {
    const words = maskWords(this.vocab);
    const row = new Int32Array(words);
    row.set(bits.subarray(0, words));
    this.device.queue.writeBuffer(this.masks, slot * words * 4, row);
  }

  /** Queues the choice of a token for each row from `logits` ([rows, vocab] f32). */
  sample(logits: GPUBuffer, rows: SampleRow[]): void {
    if (!rows.length) return;
    const data = new ArrayBuffer(rows.length * ROW_BYTES);
    const u = new Uint32Array(data);
    const f = new Float32Array(data);
    rows.forEach((r, i) => {
      const o = (i * ROW_BYTES) / 4;
      const p = r.params;
      u[o] = r.logitsRow;
      u[o + 1] = r.slot;
      u[o + 2] = r.index;
      u[o + 3] = r.seed >>> 0;
      f[o + 4] = p.temperature;
      u[o + 5] = p.topK;
      f[o + 6] = p.topP;
      f[o + 7] = p.repetitionPenalty;
      f[o + 8] = p.presencePenalty ?? 0;
      f[o + 9] = p.frequencyPenalty ?? 0;
      u[o + 10] = (hasPenalties(p) ? 1 : 0) | (r.masked ? 4 : 0) |
        (r.logprobs === undefined ? 0 : 2 | (Math.min(r.logprobs, MAX_TOP_LOGPROBS) << 8));
    });
    this.device.queue.writeBuffer(this.rows, 0, data);
    const enc = this.device.createCommandEncoder();
    const pass = enc.beginComputePass();
    pass.setPipeline(this.pipeline);
    pass.setBindGroup(0, this.group(logits));
    pass.dispatchWorkgroups(rows.length);
    pass.end();
    this.device.queue.submit([enc.finish()]);
  }

  /** The bind group of one logits buffer (prefill's and each decode bucket's are fixed buffers). */
  private group(logits: GPUBuffer): GPUBindGroup {
    let g = this.groups.get(logits);
    if (!g) {
      const buffers = [
        logits,
        this.rows,
        this.counts,
        this.ids,
        this.history,
        this.lp,
        this.consts,
        this.masks,
      ];
      g = this.device.createBindGroup({
        layout: this.pipeline.getBindGroupLayout(0),
        entries: buffers.map((buffer, binding) => ({ binding, resource: { buffer } })),
      });
      this.groups.set(logits, g);
    }
    return g;
  }

  /**
   * Starts reading the rings back (log-probabilities only when `withLogprobs`); the promise settles
   * once the GPU has written everything queued before this call.
   */
  async readBack(withLogprobs: boolean): Promise<RingSnapshot> {
    const parts = withLogprobs ? [this.history, this.lp] : [this.history];
    const total = parts.reduce((n, b) => n + b.size, 0);
    const staging = this.device.createBuffer({
      size: total,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
    const enc = this.device.createCommandEncoder();
    let at = 0;
    for (const b of parts) {
      enc.copyBufferToBuffer(b, 0, staging, at, b.size);
      at += b.size;
    }
    this.device.queue.submit([enc.finish()]);
    try {
      await staging.mapAsync(GPUMapMode.READ);
      const all = new Uint32Array(staging.getMappedRange().slice(0));
      return {
        ids: all.subarray(0, this.history.size / 4),
        lp: withLogprobs ? all.subarray(this.history.size / 4) : null,
      };
    } finally {
      staging.destroy();
    }
  }

  destroy(): void {
    for (const b of [this.rows, this.counts, this.history, this.lp, this.consts, this.masks]) b.destroy();
  }
}

/** 32-bit words of a token mask over `vocab` ids. */
const maskWords = (vocab: number) => Math.ceil(vocab / 32);

/** Token `index` of `slot` in a snapshot. */
export function ringId(snap: RingSnapshot, slot: number, index: number): number {
  return snap.ids[slot * RING + (index % RING)];
}

/** The log-probabilities of token `index` of `slot`: the chosen one's and up to `n` alternatives. */
export function ringScored(snap: RingSnapshot, slot: number, index: number, n: number): Scored {
  const base = (slot * RING + (index % RING)) * LP_STRIDE;
  const words = snap.lp!;
  const asFloat = (w: number) => new Float32Array(Uint32Array.of(w).buffer)[0];
  const top: [number, number][] = [];
  for (let k = 0; k < n; k++) {
    const id = words[base + 1 + 2 * k];
    if (id === 0xffffffff) break;
    top.push([id, asFloat(words[base + 2 + 2 * k])]);
  }
  return { logprob: asFloat(words[base]), top };
}
