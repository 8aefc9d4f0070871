import type { ModelConfig } from "../model/config.ts";
import { type Block, cachedLayers, type FfnBlock } from "../model/blocks.ts";
import type { Checkpoint, LinearWeights } from "../model/checkpoint.ts";
import { ropeInvFreq } from "../model/rope.ts";
import { f32ToF16 } from "../model/dtype.ts";
import { type Tensor, transpose2d } from "../model/tensor.ts";
import { type EncodedModel, GraphBuilder } from "./builder.ts";
import { FLOAT_WEIGHTS, formatName, type GraphOptions } from "./format.ts";
import { BITS, BLOCK, quantizable, quantize } from "./quantize.ts";
import { type Allocator, type StoredWeight, WeightCache } from "./weight_cache.ts";

/** Optimum's names, so that tooling written for exported decoders recognises ours. */
export const pastKey = (layer: number) => `past_key_values.${layer}.key`;
export const pastValue = (layer: number) => `past_key_values.${layer}.value`;
export const presentKey = (layer: number) => `present.${layer}.key`;
export const presentValue = (layer: number) => `present.${layer}.value`;

export interface DecoderGraph {
  model: EncodedModel;
  /** The activations' and KV cache's element type. */
  floatType: "float32" | "float16";
  /** Layers with a KV cache, and their KV head counts, in graph order. */
  cache: { layer: number; kvHeads: number }[];
  headDim: number;
  matmulCount: number;
  nodeCount: number;
}

/** Values every block needs: the causal+padding bias and the rotary tables. */
interface Shared {
  bias: string;
  cos: string;
  sin: string;
}

/** What the FFN-only graphs need of a model config. */
type FfnConfig = Pick<ModelConfig, "hidden" | "rmsEps">;

/** ONNX TensorProto type numbers, for Cast. */
const CAST_TO = { float32: 1, float16: 10 } as const;

/** Float data in the graph's float type, allocated where the cache keeps it. */
function asFloat(data: Float32Array, half: boolean, alloc: Allocator) {
  return half ? { elem: "float16" as const, data: f32ToF16(data, alloc.u16(data.length)) } : {
    elem: "float32" as const,
    data,
  };
}

export class DecoderEmitter {
  readonly g = new GraphBuilder();
  /** The activations' element type: fp16 graphs compute in fp16 end to end (logits are cast to fp32). */
  readonly act: "float32" | "float16";

  constructor(
    private readonly cfg: ModelConfig,
    private readonly opts: GraphOptions,
    private readonly cache: WeightCache,
  ) {
    this.act = opts.dtype === "fp16" ? "float16" : "float32";
  }

  private get half(): boolean {
    return this.act === "float16";
  }

  /** A float weight stored as it is laid out (no transpose), in the graph's float type. */
  floatWeight(name: string, t: Tensor): StoredWeight {
    return this.cache.get(name, (alloc) => ({ dims: [...t.shape], ...asFloat(t.data, this.half, alloc) }));
  }

  /**
   * x @ W^T with W in the checkpoint's [out, in] layout: a MatMul of the transposed float weight, or,
   * quantized, com.microsoft's MatMulNBits over W packed in its own layout (no transpose needed).
   * Whatever reaches here is already fused, so a fused group is quantized as the one wide matrix.
   * `w.data` is read only when the cache misses: a cached group is never fused or converted again.
   */
  linear(x: string, w: Tensor, name: string): string {
    const q = this.opts.quantize;
    const [n, k] = w.shape;
    if (q !== "none" && quantizable(w)) {
      const bits = BITS[q];
      const blocks = k / BLOCK;
      let packed: ReturnType<typeof quantize> | null = null;
      const pack = (alloc: Allocator) => (packed ??= quantize(w, bits, alloc));
      const b = this.cache.get(`${name}.q${bits}`, (alloc) => ({
        elem: "uint8",
        dims: [n, blocks, (BLOCK * bits) / 8],
        data: pack(alloc).packed,
      }));
      // MatMulNBits takes its scales in the activations' type.
      const scales = this.cache.get(`${name}.scales`, (alloc) => ({
        dims: [n * blocks],
        ...asFloat(pack(alloc).scales, this.half, alloc),
      }));
      return this.g.node(
        "MatMulNBits",
        [x, this.g.weight(`${name}.q${bits}`, b), this.g.weight(`${name}.scales`, scales)],
        { K: k, N: n, bits, block_size: BLOCK },
        1,
        "com.microsoft",
      )[0];
    }
    const t = this.cache.get(name, (alloc) => {
      // fp16 goes through a transient fp32 transpose: one tensor, never the model.
      const transposed = transpose2d(w, this.half ? new Float32Array(n * k) : alloc.f32(n * k)).data;
      return { dims: [k, n], ...asFloat(transposed, this.half, alloc) };
    });
    return this.g.op("MatMul", [x, this.g.weight(name, t)]);
  }

  rmsNorm(x: string, gain: Float32Array, name: string): string {
    const w = this.floatWeight(name, { shape: [gain.length], data: gain });
    return this.g.op("SimplifiedLayerNormalization", [x, this.g.weight(name, w)], {
      axis: -1,
      epsilon: { float: this.cfg.rmsEps },
      stash_type: 1,
    });
  }

  shared(mask: string, positions: string): Shared {
    const g = this.g;
    // T comes from position_ids, a host input: taking the Shape of input_ids, which the GPU-resident
    // decode loop passes as a GPU buffer, makes onnxruntime copy it to the host, a readback per step.
    const seqLen = g.op("Gather", [g.op("Shape", [positions]), g.ints([1], true)], { axis: 0 });
    const totalLen = g.op("Gather", [g.op("Shape", [mask]), g.ints([1], true)], { axis: 0 });
    const pastLen = g.op("Sub", [totalLen, seqLen]);
    const keyIdx = g.op("Range", [g.ints([0], true), totalLen, g.ints([1], true)]);
    const queryIdx = g.op("Unsqueeze", [g.op("Range", [pastLen, totalLen, g.ints([1], true)]), g.ints([1])]);
    const causal = g.op("LessOrEqual", [keyIdx, queryIdx]);
    const padding = g.op("Unsqueeze", [g.op("Cast", [mask], { to: 9 }), g.ints([1, 2])]);
    const allowed = g.op("And", [causal, padding]);
    // fp16's most negative finite value: -1e9 would be -inf, and a row of -inf is NaN after softmax.
    const masked = g.scalar(-65504, this.act);
    const bias = g.op("Unsqueeze", [g.op("Where", [allowed, g.scalar(0, this.act), masked]), g.ints([1])]);

    // Rotary angles reach thousands of radians at long context: computed in fp32 whatever the graph's type.
    const inv = Float32Array.from(ropeInvFreq(this.cfg.rope, this.cfg.headDim));
    const invFreq = this.cache.get(
      "rope.inv_freq",
      () => ({ elem: "float32", dims: [inv.length], data: inv }),
    );
    const pos = g.op("Unsqueeze", [g.op("Cast", [positions], { to: 1 }), g.ints([-1])]);
    const freqs = g.op("Mul", [pos, g.weight("rope.inv_freq", invFreq)]);
    const angles = g.op("Concat", [freqs, freqs], { axis: -1 });
    const table = (op: "Cos" | "Sin") => {
      const t = g.op(op, [angles]);
      return g.op("Unsqueeze", [this.half ? g.op("Cast", [t], { to: CAST_TO.float16 }) : t, g.ints([1])]);
    };
    return { bias, cos: table("Cos"), sin: table("Sin") };
  }

  /** [B, T, heads*hd] -> [B, heads, T, hd] */
  heads(x: string, n: number): string {
    const g = this.g;
    return g.op("Transpose", [g.op("Reshape", [x, g.ints([0, 0, n, this.cfg.headDim])])], {
      perm: [0, 2, 1, 3],
    });
  }

  rotary(x: string, s: Shared): string {
    const g = this.g;
    const half = this.cfg.headDim / 2;
    const [x1, x2] = g.node("Split", [x, g.ints([half, half])], { axis: -1 }, 2);
    const rotated = g.op("Concat", [g.op("Neg", [x2]), x1], { axis: -1 });
    return g.op("Add", [g.op("Mul", [x, s.cos]), g.op("Mul", [rotated, s.sin])]);
  }

  attention(x: string, b: Extract<Block, { kind: "attention" }>, s: Shared): string {
    const g = this.g;
    const { numHeads: H, headDim: hd } = this.cfg;
    const kvH = b.kvHeads;
    const rep = H / kvH;
    const p = `layers.${b.layer}.attn`;
    const h = this.rmsNorm(x, b.weights.norm, `${p}.norm`);
    const q = this.rotary(this.heads(this.linear(h, b.weights.q, `${p}.q`), H), s);
    const k = this.rotary(this.heads(this.linear(h, b.weights.k, `${p}.k`), kvH), s);
    const v = this.heads(this.linear(h, b.weights.v, `${p}.v`), kvH);
    const presentK = g.op("Concat", [pastKey(b.layer), k], { axis: 2 }, presentKey(b.layer));
    const presentV = g.op("Concat", [pastValue(b.layer), v], { axis: 2 }, presentValue(b.layer));
    // Grouped-query attention without copying K/V: query heads are viewed as [kvH, rep] and
    // K/V broadcast over the rep axis inside MatMul.
    const q5 = g.op("Reshape", [
      g.op("Mul", [q, g.scalar(1 / Math.sqrt(hd), this.act)]),
      g.ints([0, kvH, rep, -1, hd]),
    ]);
    const k5 = g.op("Unsqueeze", [g.op("Transpose", [presentK], { perm: [0, 1, 3, 2] }), g.ints([2])]);
    const v5 = g.op("Unsqueeze", [presentV, g.ints([2])]);
    const scores = g.op("Add", [g.op("MatMul", [q5, k5]), s.bias]);
    const ctx5 = g.op("MatMul", [g.op("Softmax", [scores], { axis: -1 }), v5]);
    const ctx = g.op("Reshape", [
      g.op("Transpose", [g.op("Reshape", [ctx5, g.ints([0, H, -1, hd])])], { perm: [0, 2, 1, 3] }),
      g.ints([0, 0, H * hd]),
    ]);
    return g.op("Add", [x, this.linear(ctx, b.weights.o, `${p}.o`)]);
  }

  /** The weight names of an FFN block: a fused or healed variant never shares a cache entry. */
  private ffnPrefix(b: FfnBlock): string {
    return `ffn.${b.layers.join("_")}${b.variant ? `.${b.variant}` : ""}`;
  }

  /** SwiGLU activations silu(gate h) * (up h) of h = norm(x), before the down projection. */
  ffnActivations(x: string, b: FfnBlock): string {
    const g = this.g;
    const p = this.ffnPrefix(b);
    const gain = b.norm ?? new Float32Array(this.cfg.hidden).fill(1);
    const h = this.rmsNorm(x, gain, `${p}.norm`);
    const gate = this.linear(h, b.gate, `${p}.gate`);
    const up = this.linear(h, b.up, `${p}.up`);
    return g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up]);
  }

  /** FFN_b(norm(x)) from its activations, without the residual. */
  ffnDown(act: string, b: FfnBlock): string {
    return this.linear(act, b.down, `${this.ffnPrefix(b)}.down`);
  }

  /** FFN_b(norm(x)), without the residual. */
  ffnDelta(x: string, b: FfnBlock): string {
    return this.ffnDown(this.ffnActivations(x, b), b);
  }

  ffn(x: string, b: FfnBlock): string {
    return this.g.op("Add", [x, this.ffnDelta(x, b)]);
  }

  parallelFfn(x: string, members: FfnBlock[]): string {
    const deltas = members.map((m) => this.ffnDelta(x, m));
    return this.g.op("Add", [x, deltas.length === 1 ? deltas[0] : this.g.op("Sum", deltas)]);
  }

  linearBlock(x: string, w: LinearWeights, name: string): string {
    return this.g.op("Add", [x, this.linear(this.rmsNorm(x, w.norm, `${name}.norm`), w.weight, name)]);
  }

  /** Whole layers from the same input: x + sum_m (layer_m(x) - x), each attention with its own cache. */
  parallelBlocks(x: string, members: Block[][], s: Shared): string {
    const deltas = members.map((member) => {
      const y = member.reduce((h, b) => this.block(h, b, s), x);
      return this.g.op("Sub", [y, x]);
    });
    return this.g.op("Add", [x, deltas.length === 1 ? deltas[0] : this.g.op("Sum", deltas)]);
  }

  block(x: string, b: Block, s: Shared): string {
    switch (b.kind) {
      case "attention":
        return this.attention(x, b, s);
      case "ffn":
        return this.ffn(x, b);
      case "parallel_ffn":
        return this.parallelFfn(x, b.members);
      case "parallel_blocks":
        return this.parallelBlocks(x, b.members, s);
      case "linear":
        return this.linearBlock(x, b.weights, `layers.${b.layer}.${b.part}_linear`);
    }
  }
}

/** The decoder's inputs, shared values and embedded tokens: what every graph over token ids starts from. */
function decoderFront(e: DecoderEmitter, ckpt: Checkpoint, blocks: Block[]) {
  const cfg = ckpt.config;
  const g = e.g;
  const inputIds = g.input("input_ids", "int64", ["batch_size", "sequence_length"]);
  const mask = g.input("attention_mask", "int64", ["batch_size", "total_sequence_length"]);
  const positions = g.input("position_ids", "int64", ["batch_size", "sequence_length"]);
  const cache = cachedLayers(blocks);
  for (const { layer, kvHeads } of cache) {
    g.input(pastKey(layer), e.act, ["batch_size", kvHeads, "past_sequence_length", cfg.headDim]);
    g.input(pastValue(layer), e.act, ["batch_size", kvHeads, "past_sequence_length", cfg.headDim]);
  }
  const shared = e.shared(mask, positions);
  const embed = e.floatWeight("embed_tokens", ckpt.embed);
  const x = g.op("Gather", [g.weight("embed_tokens", embed), inputIds], { axis: 0 });
  return { cache, shared, x };
}

/**
 * Builds the KV-cached decoder: inputs `input_ids`, `attention_mask`, `position_ids` and
 * `past_key_values.{i}.key/value` for each layer with attention; outputs `logits` and `present.{i}.*`.
 */
export function buildDecoderGraph(
  ckpt: Checkpoint,
  blocks: Block[],
  opts: GraphOptions = FLOAT_WEIGHTS,
  weights: WeightCache = new WeightCache(formatName(opts)),
): DecoderGraph {
  const cfg = ckpt.config;
  const e = new DecoderEmitter(cfg, opts, weights);
  const g = e.g;
  const act = e.act;
  const { cache, shared, x: embedded } = decoderFront(e, ckpt, blocks);
  let x = embedded;
  for (const b of blocks) x = e.block(x, b, shared);
  const h = e.rmsNorm(x, ckpt.finalNorm, "final_norm");
  const logits = e.linear(h, ckpt.lmHead, "lm_head");
  // Sampling reads fp32 logits whatever the graph computes in.
  g.op(
    act === "float16" ? "Cast" : "Identity",
    [logits],
    act === "float16" ? { to: CAST_TO.float32 } : {},
    "logits",
  );
  g.output("logits", "float32", ["batch_size", "sequence_length", cfg.vocabSize]);
  for (const { layer, kvHeads } of cache) {
    g.output(presentKey(layer), act, ["batch_size", kvHeads, "total_sequence_length", cfg.headDim]);
    g.output(presentValue(layer), act, ["batch_size", kvHeads, "total_sequence_length", cfg.headDim]);
  }
  return {
    model: g.encode("fusedge_decoder"),
    floatType: act,
    cache,
    headDim: cfg.headDim,
    matmulCount: g.countOps("MatMul"),
    nodeCount: g.nodeCount,
  };
}

/** The name of a stream graph's output: the residual stream entering block i. */
export const streamName = (i: number) => `stream.${i}`;

/**
 * The residual streams of a whole sequence (no cache, no logits) entering each block of `taps`, fp32:
 * `taps` index `blocks`, and `blocks.length` is the stream after the last block. Only the blocks up to
 * the last tap are emitted. What healing fits on: gathered through onnxruntime it costs a tenth of the
 * float64 reference's pass (tiny-nas, 4096 tokens: 3.2 s against 34 s here).
 */
export function buildStreamGraph(
  ckpt: Checkpoint,
  blocks: Block[],
  taps: number[],
): Pick<DecoderGraph, "model" | "cache" | "headDim" | "floatType"> {
  const last = Math.max(...taps);
  if (!taps.length || taps.some((i) => !Number.isInteger(i) || i < 0) || last > blocks.length) {
    throw new Error(`stream taps ${taps} outside 0..${blocks.length}`);
  }
  const used = blocks.slice(0, last);
  const e = new DecoderEmitter(ckpt.config, FLOAT_WEIGHTS, new WeightCache("fp32"));
  const g = e.g;
  const { cache, shared, x: embedded } = decoderFront(e, ckpt, used);
  const tap = (i: number, x: string) => {
    if (!taps.includes(i)) return;
    g.op("Identity", [x], {}, streamName(i));
    g.output(streamName(i), "float32", ["batch_size", "sequence_length", ckpt.config.hidden]);
  };
  let x = embedded;
  used.forEach((b, i) => {
    tap(i, x);
    x = e.block(x, b, shared);
  });
  tap(used.length, x);
  return { model: g.encode("fusedge_streams"), cache, headDim: ckpt.config.headDim, floatType: "float32" };
}

/**
 * A graph of FFN blocks alone, `x [T, hidden] -> y` in the graph's float type: k narrow blocks in
 * sequence, or a fused block, for comparing the two forms through onnxruntime with the same weights.
 */
export function buildFfnStackGraph(
  cfg: FfnConfig,
  blocks: FfnBlock[],
  opts: GraphOptions = FLOAT_WEIGHTS,
): { model: EncodedModel; matmulCount: number; floatType: "float32" | "float16" } {
  // FFN blocks read only hidden and rmsEps of the config; nothing attention-related is emitted.
  const e = new DecoderEmitter(cfg as ModelConfig, opts, new WeightCache(formatName(opts)));
  const g = e.g;
  let x = g.input("x", e.act, ["tokens", cfg.hidden]);
  for (const b of blocks) x = e.ffn(x, b);
  g.op("Identity", [x], {}, "y");
  g.output("y", e.act, ["tokens", cfg.hidden]);
  return {
    model: g.encode("fusedge_ffn_stack"),
    matmulCount: g.countOps("MatMul") + g.countOps("MatMulNBits"),
    floatType: e.act,
  };
}
