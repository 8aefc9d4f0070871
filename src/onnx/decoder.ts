import type { ModelConfig } from "../model/config.ts";
import { type Block, cachedLayers, type FfnBlock } from "../model/blocks.ts";
import type { Checkpoint, LinearWeights } from "../model/checkpoint.ts";
import { ropeInvFreq } from "../model/rope.ts";
import { f32ToF16 } from "../model/dtype.ts";
import { lazyTensor, type Tensor, transpose2d } from "../model/tensor.ts";
import { type EncodedModel, GraphBuilder, storedBytes } from "./builder.ts";
import { matmulAttention, type StepPositions, stepPositions } from "./matmul_attention.ts";
import { splitFactor, type SplitK } from "./split_k.ts";
import { embedsInt8, FLOAT_WEIGHTS, formatName, type GraphOptions } from "./format.ts";
import {
  BITS,
  BLOCK,
  integerBlock,
  nbitsLayout,
  quantize,
  quantizeColumns,
  quantizeRows,
  zeroPointBytes,
} from "./quantize.ts";
import { type StoredWeight, WeightCache } from "./weight_cache.ts";

/** Optimum's names, so that tooling written for exported decoders recognises ours. */
export const pastKey = (layer: number) => `past_key_values.${layer}.key`;
export const pastValue = (layer: number) => `past_key_values.${layer}.value`;
export const presentKey = (layer: number) => `present.${layer}.key`;
export const presentValue = (layer: number) => `present.${layer}.value`;
/** A step's own keys and values (the MatMul form's outputs): what a cache kept in place takes from it. */
export const newKey = (layer: number) => `new.${layer}.key`;
export const newValue = (layer: number) => `new.${layer}.value`;

export interface DecoderGraph {
  model: EncodedModel;
  /** The activations' and KV cache's element type. */
  floatType: "float32" | "float16";
  /** Layers with a KV cache, and their KV head counts, in graph order. */
  cache: { layer: number; kvHeads: number }[];
  headDim: number;
  /** Positions the rotary tables cover: no sequence may grow longer. */
  maxPositions: number;
  matmulCount: number;
  nodeCount: number;
  /**
   * Bytes a run holds at once for each position it computes and for each row of logits: the integer
   * path's block sums (int32 and fp32, [K / B, rows, N] each) in its widest linear; 0 elsewhere, where
   * a row's activations are a few vectors. A prefill chunk is sized by them.
   */
  rowBytes: { position: number; logits: number };
  /** It outputs each step's new keys and values, not presents (the MatMul form). */
  newKv: boolean;
  attention: AttentionForm;
  /**
   * It takes `sample_rows` int32 [n] (rows of its logits, flat) and `inverse_temperature` fp32 [n],
   * and outputs `sample_probs` fp32 [n, vocab], the softmax of each such row over its temperature:
   * onnxruntime's vectorized exponentials, where the host's took ~1 ms a 128K row (8 rows in 1.0-1.4
   * ms on native onnxruntime, 2.7-3.5 on WASM, with the draw from them 0.05 ms a row).
   */
  sampling: boolean;
  /**
   * The int8 embedding table whose rows the host reads for each run, fed as `embed_rows` int8 [batch,
   * seq, hidden] and `embed_scales` fp32 [batch, seq, 1] (src/ort/embedding_rows.ts); null where the
   * graph gathers from a table of its own.
   */
  embedding: HostEmbedding | null;
}

/** An int8 embedding table, a scale a row, that the host reads its tokens' rows from. */
export interface HostEmbedding {
  rows: StoredWeight;
  scales: StoredWeight;
}

/** The bytes of a decoder's weights as served: the graph's, and an embedding table the host reads rows from. */
export function servedWeightBytes(graph: DecoderGraph): number {
  const table = graph.embedding ? graph.embedding.rows.byteLength + graph.embedding.scales.byteLength : 0;
  return storedBytes(graph.model) + table;
}

/**
 * How attention is emitted: onnxruntime's fused GroupQueryAttention, or standard operators over caches
 * kept in place (matmul_attention.ts: no presents, only each step's new keys and values), which the
 * host devices build.
 */
export type AttentionForm = "fused" | "matmul";

/** The rotary tables GroupQueryAttention reads, [maxPositions, headDim / 2] in the activations' type. */
interface Shared {
  cos: string;
  sin: string;
}

/**
 * The residual stream between blocks: `base`, plus the last block's output `delta` when that is not
 * added in yet. The next RMSNorm adds it (SkipSimplifiedLayerNormalization: one node for the residual
 * add and the norm, instead of two).
 */
export interface Residual {
  base: string;
  delta: string | null;
}

/** What the FFN-only graphs need of a model config. */
type FfnConfig = Pick<ModelConfig, "hidden" | "rmsEps">;

/** The LM head's weight name: the one linear that runs over logit rows, not positions. */
const HEAD = "lm_head";

/** ONNX TensorProto type numbers, for Cast. */
const CAST_TO = { float32: 1, uint8: 2, float16: 10 } as const;

/** Float data in the graph's float type. */
function asFloat(data: Float32Array, half: boolean) {
  return half ? { elem: "float16" as const, data: f32ToF16(data) } : {
    elem: "float32" as const,
    data,
  };
}

/** Rows of several [n_i, k] weights stacked into one [sum n_i, k], computed only when read. */
function stackRows(parts: Tensor[]): Tensor {
  const k = parts[0].shape[1];
  const n = parts.reduce((s, t) => s + t.shape[0], 0);
  return lazyTensor([n, k], () => {
    const out = new Float32Array(n * k);
    let at = 0;
    for (const t of parts) {
      out.set(t.data, at);
      at += t.data.length;
    }
    return out;
  });
}

export class DecoderEmitter {
  readonly g: GraphBuilder;
  /** The table the host reads embedding rows from, once `embed` has taken it that way. */
  hostEmbedding: HostEmbedding | null = null;
  /** The activations' element type: fp16 graphs compute in fp16 end to end (logits are cast to fp32). */
  readonly act: "float32" | "float16";

  constructor(
    private readonly cfg: ModelConfig,
    private readonly opts: GraphOptions,
    private readonly cache: WeightCache,
    weightsAsInputs = false,
    /** A decode step's graph (one position a row): how its float linears split their inner dimension. */
    private readonly step: SplitK | null = null,
    readonly attentionForm: AttentionForm = "fused",
  ) {
    this.act = opts.dtype === "fp16" ? "float16" : "float32";
    // The MatMul form's mask and scale are fp32; onnxruntime's CPU kernels are what it is for.
    if (attentionForm === "matmul" && this.act !== "float32") {
      throw new Error("attention from MatMuls is built for fp32 graphs only");
    }
    this.g = new GraphBuilder(weightsAsInputs);
  }

  private get half(): boolean {
    return this.act === "float16";
  }

  /** A float weight stored as it is laid out (no transpose), in the graph's float type. */
  floatWeight(name: string, t: Tensor): StoredWeight {
    return this.cache.get(
      name,
      () => ({ dims: [...t.shape], ...asFloat(t.data, this.half), borrowed: !this.half }),
    );
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
    const layout = nbitsLayout(k, this.opts);
    if (q !== "none" && layout) {
      if (this.opts.integer) return this.integerLinear(x, w, name, q);
      const { bits, block, zeroPoints } = layout;
      const blocks = k / block;
      // The layout is in the names: a cache kept across builds never hands one layout's bytes to another.
      const key = `${name}.q${bits}${block === BLOCK ? "" : `b${block}`}${zeroPoints ? "z" : ""}`;
      let packed: ReturnType<typeof quantize> | null = null;
      const pack = () => (packed ??= quantize(w, layout, this.cache.convert));
      const b = this.cache.get(key, () => ({
        elem: "uint8",
        dims: [n, blocks, (block * bits) / 8],
        data: pack().packed,
      }));
      // MatMulNBits takes its scales in the activations' type.
      const scales = this.cache.get(`${key}.scales`, () => ({
        dims: [n * blocks],
        ...asFloat(pack().scales, this.half),
      }));
      const inputs = [x, this.g.weight(key, b), this.g.weight(`${key}.scales`, scales)];
      if (zeroPoints) {
        const zeros = this.cache.get(`${key}.zeros`, () => ({
          elem: "uint8",
          dims: [n * zeroPointBytes(blocks)],
          data: pack().zeros!,
        }));
        inputs.push(this.g.weight(`${key}.zeros`, zeros));
      }
      return this.g.node(
        "MatMulNBits",
        inputs,
        {
          K: k,
          N: n,
          bits,
          block_size: block,
          ...(this.opts.accuracy ? { accuracy_level: this.opts.accuracy } : {}),
        },
        1,
        "com.microsoft",
      )[0];
    }
    const t = this.cache.get(name, () => {
      // fp16 goes through a transient fp32 transpose: one tensor, never the model.
      const transposed = transpose2d(w).data;
      return { dims: [k, n], ...asFloat(transposed, this.half) };
    });
    // Never the LM head: thousands of column groups already at real vocabularies, and its output is
    // the graph's, which a captured fp32 step leaves unwritten behind a Reshape (measured on lavapipe).
    const parts = this.step && name !== HEAD ? splitFactor(k, n, this.step) : 1;
    if (parts === 1) return this.g.op("MatMul", [x, this.g.weight(name, t)]);
    // The same bytes seen as [parts, K / parts, N]: the step's sessions bind the prefill's buffer.
    const w3 = this.g.weight(name, { ...t, dims: [parts, k / parts, n] });
    const g = this.g;
    const xs = g.op("Transpose", [g.op("Reshape", [x, g.ints([-1, parts, k / parts])])], { perm: [1, 0, 2] });
    const sum = g.op("ReduceSum", [g.op("MatMul", [xs, w3]), g.ints([0])], { keepdims: 0 });
    return g.op("Reshape", [sum, g.ints([-1, 1, n])]);
  }

  /** What the integer linears emitted so far hold a row (see DecoderGraph.rowBytes). */
  readonly rowBytes = { position: 0, logits: 0 };

  /** Activations rounded to int8 per row and block, shared by every linear that reads them in that block. */
  private readonly blockQuantized = new Map<string, { xq: string; scale: string; lead: string }>();

  /**
   * x @ W^T through MatMulInteger (the integer path, GraphOptions.integer). Each row of x is cut into
   * blocks along K (integerBlock) and each block rounded to int8 with its own scale: one scale a row
   * left the down projection's input (a few large products of gate and up among thousands of small
   * ones) much further from fp32 than the weights' rounding. A row never depends on what else is in
   * the batch. The blocks are MatMulInteger's batch, [K/B, rows, B] x [K/B, B, N] -> int32 sums a block,
   * scaled by their block's scale and summed in fp32. Activations are stored as uint8 about the zero
   * point 128: onnxruntime's WASM SIMD kernel takes uint8 x int8; int8 x int8 has none and falls back to
   * scalar code.
   * W is int8 per output column and block.
   */
  private integerLinear(x: string, w: Tensor, name: string, q: "int8" | "int4"): string {
    const g = this.g;
    const [n, k] = w.shape;
    const block = integerBlock(n, k);
    const blocks = k / block;
    const sumBytes = 2 * blocks * n * 4;
    if (name === HEAD) this.rowBytes.logits = sumBytes;
    else this.rowBytes.position = Math.max(this.rowBytes.position, sumBytes);
    let cols: ReturnType<typeof quantizeColumns> | null = null;
    const pack = () => (cols ??= quantizeColumns(w, q, block, this.cache.convert));
    const key = `${name}.i8c${BITS[q]}`;
    const wq = this.cache.get(
      key,
      () => ({ elem: "int8", dims: [blocks, block, n], data: pack().q }),
    );
    const ws = this.cache.get(`${key}.scales`, () => ({
      elem: "float32",
      dims: [blocks, 1, n],
      data: pack().scales,
    }));
    let act = this.blockQuantized.get(`${x}/${block}`);
    if (!act) {
      const lead = g.op("Shape", [x], { end: -1 });
      const split = g.op("Transpose", [g.op("Reshape", [x, g.ints([-1, blocks, block])])], {
        perm: [1, 0, 2],
      });
      const amax = g.op("ReduceMax", [g.op("Abs", [split])], { axes: [-1], keepdims: 1 });
      const scale = g.op("Mul", [g.op("Max", [amax, g.scalar(1e-30)]), g.scalar(1 / 127)]);
      const rounded = g.op("Round", [g.op("Div", [split, scale])]);
      const xq = g.op("Cast", [g.op("Add", [rounded, g.scalar(128)])], { to: CAST_TO.uint8 });
      act = { xq, scale, lead };
      this.blockQuantized.set(`${x}/${block}`, act);
    }
    const sums = g.op("MatMulInteger", [act.xq, g.weight(key, wq), g.byte(128)]);
    const scaled = g.op("Mul", [g.op("Cast", [sums], { to: CAST_TO.float32 }), act.scale]);
    const both = g.op("Mul", [scaled, g.weight(`${key}.scales`, ws)]);
    const y = g.op("ReduceSum", [both, g.ints([0])], { keepdims: 0 });
    return g.op("Reshape", [y, g.op("Concat", [act.lead, g.ints([n])], { axis: 0 })]);
  }

  /** Token ids to their embeddings: a Gather of the table, or where embedsInt8 its int8 rows the host reads. */
  embed(ids: string, table: Tensor): string {
    const g = this.g;
    if (!embedsInt8(this.opts)) {
      return g.op("Gather", [g.weight("embed_tokens", this.floatWeight("embed_tokens", table)), ids], {
        axis: 0,
      });
    }
    let rows: ReturnType<typeof quantizeRows> | null = null;
    const pack = () => (rows ??= quantizeRows(table, this.cache.convert));
    const q = this.cache.get(
      "embed_tokens.i8r",
      () => ({ elem: "int8", dims: [...table.shape], data: pack().q }),
    );
    const s = this.cache.get("embed_tokens.i8r.scales", () => ({
      elem: "float32",
      dims: [table.shape[0]],
      data: pack().scales,
    }));
    // The table is no weight of the graph: a run's tokens' rows come in as inputs (HostEmbedding).
    this.hostEmbedding = { rows: q, scales: s };
    const picked = g.input("embed_rows", "int8", ["batch_size", "sequence_length", table.shape[1]]);
    const scale = g.input("embed_scales", "float32", ["batch_size", "sequence_length", 1]);
    return g.op("Mul", [g.op("Cast", [picked], { to: CAST_TO.float32 }), scale]);
  }

  private gain(gain: Float32Array, name: string): string {
    return this.g.weight(name, this.floatWeight(name, { shape: [gain.length], data: gain }));
  }

  rmsNorm(x: string, gain: Float32Array, name: string): string {
    return this.g.op("SimplifiedLayerNormalization", [x, this.gain(gain, name)], {
      axis: -1,
      epsilon: { float: this.cfg.rmsEps },
      stash_type: 1,
    });
  }

  /** The stream a block reads (`x`, the pending delta added in) and its RMSNorm `h`, in one node when it can. */
  normed(r: Residual, gain: Float32Array, name: string): { x: string; h: string } {
    if (r.delta === null) return { x: r.base, h: this.rmsNorm(r.base, gain, name) };
    const [h, , , x] = this.g.node(
      "SkipSimplifiedLayerNormalization",
      [r.base, r.delta, this.gain(gain, name)],
      { epsilon: { float: this.cfg.rmsEps } },
      [this.g.name("skip_norm"), "", "", this.g.name("residual")],
      "com.microsoft",
    );
    return { x, h };
  }

  /** The stream as one value: the pending delta added in. */
  materialize(r: Residual): string {
    return r.delta === null ? r.base : this.g.op("Add", [r.base, r.delta]);
  }

  /**
   * The rotary tables GroupQueryAttention rotates q and k with, [maxPositions, headDim / 2]: angles in
   * float64 on the host (they reach thousands of radians at long context), stored in the activations'
   * type as the operator requires.
   */
  rotaryTables(): Shared {
    const { headDim, maxPositions } = this.cfg;
    const inv = ropeInvFreq(this.cfg.rope, headDim);
    const half = headDim / 2;
    const table = (fn: (a: number) => number) => () => {
      const t = new Float32Array(maxPositions * half);
      for (let p = 0; p < maxPositions; p++) {
        for (let i = 0; i < half; i++) t[p * half + i] = fn(p * inv[i]);
      }
      return { dims: [maxPositions, half], ...asFloat(t, this.half) };
    };
    return {
      cos: this.g.weight("rope.cos", this.cache.get(`rope.cos.${maxPositions}`, table(Math.cos))),
      sin: this.g.weight("rope.sin", this.cache.get(`rope.sin.${maxPositions}`, table(Math.sin))),
    };
  }

  /**
   * Pre-norm attention as onnxruntime's fused operator: one MatMul for q, k and v stacked, then
   * com.microsoft GroupQueryAttention, which rotates q and k (rotate-half) from the tables at each
   * row's own positions (`seqlens_k`), writes the new keys and values into the cache, and attends
   * causally within each row's length.
   */
  attention(r: Residual, b: Extract<Block, { kind: "attention" }>, s: Shared, seq: Sequence): Residual {
    const { numHeads, headDim } = this.cfg;
    const p = `layers.${b.layer}.attn`;
    const { x, h } = this.normed(r, b.weights.norm, `${p}.norm`);
    const { q, k, v, o } = b.weights;
    const qkv = this.linear(h, stackRows([q, k, v]), `${p}.qkv`);
    if (seq.step) {
      const ctx = matmulAttention(this.g, qkv, { numHeads, kvHeads: b.kvHeads, headDim }, seq.step, s, {
        pastKey: pastKey(b.layer),
        pastValue: pastValue(b.layer),
        newKey: newKey(b.layer),
        newValue: newValue(b.layer),
      });
      return { base: x, delta: this.linear(ctx, o, `${p}.o`) };
    }
    const [ctx] = this.g.node(
      "GroupQueryAttention",
      [qkv, "", "", pastKey(b.layer), pastValue(b.layer), seq.seqlensK, seq.totalLength, s.cos, s.sin],
      {
        num_heads: numHeads,
        kv_num_heads: b.kvHeads,
        scale: { float: 1 / Math.sqrt(headDim) },
        do_rotary: 1,
      },
      [this.g.name("attn"), presentKey(b.layer), presentValue(b.layer)],
      "com.microsoft",
    );
    return { base: x, delta: this.linear(ctx, o, `${p}.o`) };
  }

  /** The weight names of an FFN block: a fused or healed variant never shares a cache entry. */
  private ffnPrefix(b: FfnBlock): string {
    return `ffn.${b.layers.join("_")}${b.variant ? `.${b.variant}` : ""}`;
  }

  /** The RMSNorm gain an FFN block's input is scaled by: ones when fusion folded it into gate and up. */
  ffnGain(b: FfnBlock): Float32Array {
    return b.norm ?? new Float32Array(this.cfg.hidden).fill(1);
  }

  /** SwiGLU activations silu(gate h) * (up h) of the normed input h, before the down projection. */
  ffnActivations(h: string, b: FfnBlock): string {
    const g = this.g;
    const p = this.ffnPrefix(b);
    const gate = this.linear(h, b.gate, `${p}.gate`);
    const up = this.linear(h, b.up, `${p}.up`);
    return g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up]);
  }

  /** FFN_b(norm(x)) from its activations, without the residual. */
  ffnDown(act: string, b: FfnBlock): string {
    return this.linear(act, b.down, `${this.ffnPrefix(b)}.down`);
  }

  ffnNormName(b: FfnBlock): string {
    return `${this.ffnPrefix(b)}.norm`;
  }

  ffn(r: Residual, b: FfnBlock): Residual {
    const { x, h } = this.normed(r, this.ffnGain(b), this.ffnNormName(b));
    return { base: x, delta: this.ffnDown(this.ffnActivations(h, b), b) };
  }

  /** Adds in a chain: onnxruntime's WebGPU provider has no Sum kernel (a Sum would run on the CPU). */
  private sum(deltas: string[]): string {
    return deltas.reduce((a, b) => this.g.op("Add", [a, b]));
  }

  /** x + sum_j FFN_j(norm_j(x)): the first member's norm adds the pending delta in, the others read x. */
  parallelFfn(r: Residual, members: FfnBlock[]): Residual {
    const first = this.normed(r, this.ffnGain(members[0]), this.ffnNormName(members[0]));
    const deltas = members.map((m, i) => {
      const h = i === 0 ? first.h : this.rmsNorm(first.x, this.ffnGain(m), this.ffnNormName(m));
      return this.ffnDown(this.ffnActivations(h, m), m);
    });
    return { base: first.x, delta: this.sum(deltas) };
  }

  linearBlock(r: Residual, w: LinearWeights, name: string): Residual {
    const { x, h } = this.normed(r, w.norm, `${name}.norm`);
    return { base: x, delta: this.linear(h, w.weight, name) };
  }

  /** Whole layers from the same input: x + sum_m (layer_m(x) - x), each attention with its own cache. */
  parallelBlocks(r: Residual, members: Block[][], s: Shared, seq: Sequence): Residual {
    const x = this.materialize(r);
    const deltas = members.map((member) => {
      const y = member.reduce((h, b) => this.block(h, b, s, seq), { base: x, delta: null } as Residual);
      return this.g.op("Sub", [this.materialize(y), x]);
    });
    return { base: x, delta: this.sum(deltas) };
  }

  block(r: Residual, b: Block, s: Shared, seq: Sequence): Residual {
    switch (b.kind) {
      case "attention":
        return this.attention(r, b, s, seq);
      case "ffn":
        return this.ffn(r, b);
      case "parallel_ffn":
        return this.parallelFfn(r, b.members);
      case "parallel_blocks":
        return this.parallelBlocks(r, b.members, s, seq);
      case "linear":
        return this.linearBlock(r, b.weights, `layers.${b.layer}.${b.part}_linear`);
    }
  }
}

/** The graph inputs that say where each row stands: GroupQueryAttention's lengths. */
interface Sequence {
  /** int32 [batch]: per row, the tokens in its cache after this step, minus one. */
  seqlensK: string;
  /** int32 scalar: the longest row's tokens after this step. */
  totalLength: string;
  /** What the MatMul form's layers share; null where attention is fused. */
  step: StepPositions | null;
}

/**
 * The decoder's inputs, shared values and embedded tokens: what every graph over token ids starts
 * from.
 */
function decoderFront(e: DecoderEmitter, ckpt: Checkpoint, blocks: Block[]) {
  const cfg = ckpt.config;
  const g = e.g;
  const inputIds = g.input("input_ids", "int32", ["batch_size", "sequence_length"]);
  const seqlensK = g.input("seqlens_k", "int32", ["batch_size"]);
  const totalLength = g.input("total_sequence_length", "int32", []);
  const cache = cachedLayers(blocks);
  for (const { layer, kvHeads } of cache) {
    g.input(pastKey(layer), e.act, ["batch_size", kvHeads, "past_sequence_length", cfg.headDim]);
    g.input(pastValue(layer), e.act, ["batch_size", kvHeads, "past_sequence_length", cfg.headDim]);
  }
  const step = cache.length && e.attentionForm === "matmul"
    ? stepPositions(g, inputIds, seqlensK, pastKey(cache[0].layer))
    : null;
  const seq: Sequence = { seqlensK, totalLength, step };
  const shared = cache.length ? e.rotaryTables() : { cos: "", sin: "" };
  const x = e.embed(inputIds, ckpt.embed);
  return { cache, shared, seq, residual: { base: x, delta: null } as Residual };
}

/** How a decoder graph is laid out for its sessions. */
export interface DecoderLayout {
  /**
   * Weights as graph inputs (bound to GPU buffers the caller uploads once) instead of initializers:
   * several sessions of one model (prefill, and captured decode steps at each batch size) then share
   * one copy of the weights.
   */
  weightsAsInputs?: boolean;
  /**
   * The graph of one decode step: one position and one logit row a sequence. Its float linears run
   * split along their inner dimension (src/onnx/split_k.ts); the weights stay the same bytes, declared
   * as [parts, K / parts, N], so with `weightsAsInputs` the step's sessions bind the prefill's buffers.
   */
  step?: SplitK;
  /** How attention is emitted (AttentionForm); fused by default. */
  attention?: AttentionForm;
  /** Temperature sampling's exponentials in the graph (DecoderGraph.sampling), for a host engine. */
  sampling?: boolean;
}

/**
 * Builds the KV-cached decoder. Inputs: `input_ids` int32 [batch, seq]; `seqlens_k` int32 [batch] and
 * `total_sequence_length` int32 (GroupQueryAttention's: each row's cached tokens after the step minus
 * one, and the longest row's count); `logit_positions` int32 [batch, rows], flat indices into the
 * batch * seq positions whose logits are computed (a prefill wants only its last position's: the LM
 * head is the largest matrix of a small model); `past_key_values.{i}.key/value` [batch, kvHeads,
 * past, headDim]. Rows are right-padded: row b's tokens are positions 0..seqlens_k[b] of its cache.
 * Outputs `logits` fp32 [batch, rows, vocab] and `present.{i}.*`, which may share the past's buffers
 * (under the MatMul form, `new.{i}.*` instead: see DecoderLayout.attention); `sample_probs` where
 * asked for (DecoderGraph.sampling).
 */
export function buildDecoderGraph(
  ckpt: Checkpoint,
  blocks: Block[],
  opts: GraphOptions = FLOAT_WEIGHTS,
  weights: WeightCache = new WeightCache(formatName(opts)),
  layout: DecoderLayout = {},
): DecoderGraph {
  const cfg = ckpt.config;
  const e = new DecoderEmitter(cfg, opts, weights, layout.weightsAsInputs, layout.step, layout.attention);
  const g = e.g;
  const act = e.act;
  // The MatMul form keeps caches in place by construction: it writes no presents.
  const matmul = e.attentionForm === "matmul";
  const { cache, shared, seq, residual } = decoderFront(e, ckpt, blocks);
  const out = blocks.reduce((r, b) => e.block(r, b, shared, seq), residual);
  const { h } = e.normed(out, ckpt.finalNorm, "final_norm");
  const positions = g.input("logit_positions", "int32", ["batch_size", "logit_rows"]);
  const rows = g.op("Gather", [g.op("Reshape", [h, g.ints([-1, cfg.hidden])]), positions], { axis: 0 });
  const logits = e.linear(rows, ckpt.lmHead, HEAD);
  // Sampling reads fp32 logits whatever the graph computes in.
  g.op(
    act === "float16" ? "Cast" : "Identity",
    [logits],
    act === "float16" ? { to: CAST_TO.float32 } : {},
    "logits",
  );
  g.output("logits", "float32", ["batch_size", "logit_rows", cfg.vocabSize]);
  if (layout.sampling) {
    const picked = g.op("Gather", [
      g.op("Reshape", ["logits", g.ints([-1, cfg.vocabSize])]),
      g.input("sample_rows", "int32", ["sampled"]),
    ], { axis: 0 });
    const inverse = g.op("Unsqueeze", [g.input("inverse_temperature", "float32", ["sampled"]), g.ints([1])]);
    g.op("Softmax", [g.op("Mul", [picked, inverse])], { axis: -1 }, "sample_probs");
    g.output("sample_probs", "float32", ["sampled", cfg.vocabSize]);
  }
  for (const { layer, kvHeads } of cache) {
    if (matmul) {
      g.output(newKey(layer), act, ["batch_size", kvHeads, "sequence_length", cfg.headDim]);
      g.output(newValue(layer), act, ["batch_size", kvHeads, "sequence_length", cfg.headDim]);
      continue;
    }
    g.output(presentKey(layer), act, ["batch_size", kvHeads, "present_sequence_length", cfg.headDim]);
    g.output(presentValue(layer), act, ["batch_size", kvHeads, "present_sequence_length", cfg.headDim]);
  }
  return {
    model: g.encode("fusedge_decoder"),
    floatType: act,
    cache,
    headDim: cfg.headDim,
    maxPositions: cfg.maxPositions,
    matmulCount: g.countOps("MatMul") + g.countOps("MatMulNBits"),
    nodeCount: g.nodeCount,
    rowBytes: { ...e.rowBytes },
    newKv: matmul && cache.length > 0,
    attention: e.attentionForm,
    sampling: layout.sampling ?? false,
    embedding: e.hostEmbedding,
  };
}

/** The name of a stream graph's output: the residual stream entering block i. */
export const streamName = (i: number) => `stream.${i}`;

/**
 * The residual streams of a whole sequence (no cache, no logits) entering each block of `taps`, fp32:
 * `taps` index `blocks`, and `blocks.length` is the stream after the last block. Only the blocks up to
 * the last tap are emitted. What healing fits on: gathered through onnxruntime, not by the float64
 * reference's pass, which is an order of magnitude slower (bench/results/2026-11-26-cpu-tiny-nas-heal-gather.txt).
 */
export function buildStreamGraph(
  ckpt: Checkpoint,
  blocks: Block[],
  taps: number[],
): Pick<DecoderGraph, "model" | "cache" | "headDim" | "floatType" | "maxPositions"> {
  const last = Math.max(...taps);
  if (!taps.length || taps.some((i) => !Number.isInteger(i) || i < 0) || last > blocks.length) {
    throw new Error(`stream taps ${taps} outside 0..${blocks.length}`);
  }
  const used = blocks.slice(0, last);
  const e = new DecoderEmitter(ckpt.config, FLOAT_WEIGHTS, new WeightCache("fp32"));
  const g = e.g;
  const { cache, shared, seq, residual } = decoderFront(e, ckpt, used);
  const tap = (i: number, r: Residual): Residual => {
    if (!taps.includes(i)) return r;
    const x = e.materialize(r);
    g.op("Identity", [x], {}, streamName(i));
    g.output(streamName(i), "float32", ["batch_size", "sequence_length", ckpt.config.hidden]);
    return { base: x, delta: null };
  };
  const out = used.reduce((r, b, i) => e.block(tap(i, r), b, shared, seq), residual);
  tap(used.length, out);
  return {
    model: g.encode("fusedge_streams"),
    cache,
    headDim: ckpt.config.headDim,
    floatType: "float32",
    maxPositions: ckpt.config.maxPositions,
  };
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
  const input = g.input("x", e.act, ["tokens", cfg.hidden]);
  const x = e.materialize(blocks.reduce((r, b) => e.ffn(r, b), { base: input, delta: null } as Residual));
  g.op("Identity", [x], {}, "y");
  g.output("y", e.act, ["tokens", cfg.hidden]);
  return {
    model: g.encode("fusedge_ffn_stack"),
    matmulCount: g.countOps("MatMul") + g.countOps("MatMulNBits"),
    floatType: e.act,
  };
}
