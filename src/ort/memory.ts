import { InputError } from "../errors.ts";
import type { ModelConfig } from "../model/config.ts";
import { embedsInt8, formatName, type GraphOptions } from "../onnx/format.ts";
import { weightBytes } from "../onnx/quantize.ts";
import type { Device } from "./ort.ts";

/** What a model needs in memory under one weight format, from its config alone (nothing loaded). */
export interface MemoryEstimate {
  /** The weights as served: embedding (int8 a row where embedsInt8) and norms, MatMul weights as stored. */
  weightBytes: number;
  /** The KV cache of one sequence per token of context (keys and values of every attention). */
  kvBytesPerToken: number;
  /** The largest single weight tensor: what one GPU buffer must hold. */
  largestTensorBytes: number;
  /** What a decode step reads of the weights for one token: all but the embedding (a row is gathered). */
  readBytesPerToken: number;
  /**
   * Of weightBytes, what a device holds: all but an int8 embedding table, whose rows the host reads from
   * its file (src/ort/embedding_rows.ts), so it stays out of WASM's heap.
   */
  heldBytes: number;
}

export function estimateMemory(cfg: ModelConfig, g: GraphOptions): MemoryEstimate {
  const d = cfg.hidden;
  const f = g.dtype === "fp16" ? 2 : 4;
  // An int8 embedding is a byte a value and a float scale a row.
  const embed = embedsInt8(g) ? cfg.vocabSize * (d + 4) : cfg.vocabSize * d * f;
  const head = weightBytes(cfg.vocabSize, d, g);
  let total = embed + head + d * f;
  let kv = 0;
  let largest = Math.max(embed, head);
  const add = (n: number, k: number) => {
    const b = weightBytes(n, k, g);
    total += b;
    largest = Math.max(largest, b);
  };
  const layers = cfg.layers.flatMap((l) => l.parallel ?? [l]);
  // Attention's rotary tables: cos and sin, [maxPositions, headDim / 2] each.
  if (layers.some((l) => l.attention.kind === "full")) total += cfg.maxPositions * cfg.headDim * f;
  for (const layer of layers) {
    const a = layer.attention;
    if (a.kind === "full") {
      const qDim = cfg.numHeads * cfg.headDim;
      const kvDim = a.kvHeads * cfg.headDim;
      // q, k and v are one stacked weight.
      add(qDim + 2 * kvDim, d), add(d, qDim);
      total += d * f;
      kv += 2 * kvDim * f;
    } else if (a.kind === "linear") add(d, d), total += d * f;
    const ffn = layer.ffn;
    if (ffn.kind === "swiglu") {
      add(ffn.intermediate, d), add(ffn.intermediate, d), add(d, ffn.intermediate), total += d * f;
    } else if (ffn.kind === "linear") add(d, d), total += d * f;
  }
  return {
    weightBytes: total,
    kvBytesPerToken: kv,
    largestTensorBytes: largest,
    readBytesPerToken: total - embed,
    heldBytes: embedsInt8(g) ? total - embed : total,
  };
}

/** WASM's 32-bit heap, less what onnxruntime itself and the activations need. */
export const WASM_USABLE_BYTES = 4 * 2 ** 30 - 256 * 2 ** 20;

const gb = (b: number) => `${(b / 1e9).toFixed(2)} GB`;

/**
 * Refuses, before any weight is read, a model that cannot fit the device: on WASM the weights plus the
 * KV cache of `sequences` full-context sequences must fit the 4 GiB heap; on WebGPU the largest tensor
 * must fit one buffer. The message names the sizes and the options that would fit.
 */
export function checkModelFits(
  cfg: ModelConfig,
  g: GraphOptions,
  device: Device,
  opts: { sequences: number; maxBufferBytes?: number; freeHostBytes?: number },
): MemoryEstimate {
  const est = estimateMemory(cfg, g);
  const kv = est.kvBytesPerToken * cfg.maxPositions * opts.sequences;
  const free = opts.freeHostBytes ?? Deno.systemMemoryInfo().available;
  if (device === "cpu" && est.weightBytes + kv > free) {
    throw new InputError(
      `the model needs ${gb(est.weightBytes)} of ${formatName(g)} weights and ${gb(kv)} of KV cache ` +
        `(${cfg.maxPositions} tokens x ${opts.sequences}), more than the ${gb(free)} of memory free here; ` +
        "try --quantize int8 or int4, or --max-context",
      "model",
    );
  }
  if (device === "wasm" && est.heldBytes + kv > WASM_USABLE_BYTES) {
    const options = (["int8", "int4"] as const)
      .filter((alt) => alt !== g.quantize)
      // WASM serves quantized weights on its integer path (int4 at int8's size).
      .map((alt) => ({
        alt,
        need: estimateMemory(cfg, { ...g, quantize: alt, integer: true }).heldBytes + kv,
      }))
      .filter((o) => o.need <= WASM_USABLE_BYTES)
      .map((o) => `--quantize ${o.alt} (${gb(o.need)})`);
    options.push("--device cpu (native onnxruntime: no heap limit)", "--device webgpu");
    throw new InputError(
      `the model needs ${gb(est.heldBytes)} of ${formatName(g)} weights and ${
        gb(kv)
      } of KV cache (${cfg.maxPositions} tokens x ${opts.sequences} sequence${
        opts.sequences > 1 ? "s" : ""
      }), more than WASM's ${gb(WASM_USABLE_BYTES)} heap; options that fit: ${options.join(", ")}`,
      "model",
    );
  }
  if (device === "webgpu" && opts.maxBufferBytes && est.largestTensorBytes > opts.maxBufferBytes) {
    throw new InputError(
      `the model's largest weight is ${gb(est.largestTensorBytes)}, more than the adapter's largest buffer (${
        gb(opts.maxBufferBytes)
      }); try ${g.dtype === "fp32" ? "--dtype fp16, " : ""}--quantize int8 or int4`,
      "model",
    );
  }
  return est;
}

/** The default budget's ceiling: room for dozens of long sequences of a 1B-8B model, bounded host memory. */
const DEFAULT_KV_CAP = 2 ** 30;

const mb = (b: number) => `${(b / 2 ** 20).toFixed(0)} MB`;

/**
 * The KV-cache budget admission keeps to (--kv-cache-mb), checked against the device before any
 * weight is read. A decode step holds the batch's cache twice for a moment (its past in, its present
 * out), so on WASM the weights and twice the budget must fit the heap. The default is the smallest
 * of 1 GiB, a quarter of the memory the host has free, and on WASM what the heap leaves; it must hold
 * at least one full-context sequence.
 */
export function kvBudgetBytes(
  cfg: ModelConfig,
  g: GraphOptions,
  device: Device,
  requestedMb?: number,
  freeHostBytes = Deno.systemMemoryInfo().available,
): number {
  const est = estimateMemory(cfg, g);
  const heapRoom = device === "wasm" ? Math.max(0, (WASM_USABLE_BYTES - est.heldBytes) / 2) : Infinity;
  const oneSequence = est.kvBytesPerToken * cfg.maxPositions;
  if (requestedMb !== undefined) {
    const bytes = requestedMb * 2 ** 20;
    if (bytes > heapRoom) {
      throw new InputError(
        `${requestedMb} MB of KV cache does not fit WASM's heap beside ${gb(est.heldBytes)} of ${
          formatName(g)
        } weights (a step holds the cache twice): at most ${mb(heapRoom)}`,
        "kv_cache_mb",
      );
    }
    return bytes;
  }
  const bytes = Math.min(DEFAULT_KV_CAP, freeHostBytes / 4, heapRoom);
  return Math.max(bytes, Math.min(oneSequence, heapRoom));
}

/** The default prefix cache's floor: the whole-context conversations of a small model. */
const PREFIX_CACHE_FLOOR = 64 * 2 ** 20;

/**
 * What the finished sequences a host engine keeps for prefix reuse may hold (--prefix-cache-mb),
 * within the KV budget, which live sequences take first. The default is an eighth of the served weights
 * (at least 64 MB): a cache sized to the model, as llama.cpp's default 4096-token f16 context costs a
 * 1B-8B model 0.11-0.23x its Q4 weights. The budget itself is sized for live sequences (up to 1 GiB,
 * or a whole context: 8.6 GB for a 1B model's 131072 tokens), too much to fill with finished ones beside
 * a 1B model's 0.9 GB of int4 weights.
 */
export function prefixCacheBytes(
  cfg: ModelConfig,
  g: GraphOptions,
  budgetBytes: number,
  requestedMb?: number,
): number {
  if (requestedMb === undefined) {
    return Math.min(budgetBytes, Math.max(PREFIX_CACHE_FLOOR, estimateMemory(cfg, g).weightBytes / 8));
  }
  const bytes = requestedMb * 2 ** 20;
  if (bytes > budgetBytes) {
    throw new InputError(
      `a prefix cache of ${requestedMb} MB is more than the ${mb(budgetBytes)} KV budget it is part of; ` +
        "raise --kv-cache-mb or lower --prefix-cache-mb",
      "prefix_cache_mb",
    );
  }
  return bytes;
}
