import { InputError } from "../errors.ts";
import type { ModelConfig } from "../model/config.ts";
import { type Quantization, weightBytes } from "../onnx/quantize.ts";
import type { Device } from "./ort.ts";

/** What a model needs in memory under one weight format, from its config alone (nothing loaded). */
export interface MemoryEstimate {
  /** The graph's weights: fp32 embedding (a Gather) and norms, the MatMul weights as stored. */
  weightBytes: number;
  /** The KV cache of one sequence per token of context (fp32 keys and values of every attention). */
  kvBytesPerToken: number;
  /** The largest single weight tensor: what one GPU buffer must hold. */
  largestTensorBytes: number;
}

export function estimateMemory(cfg: ModelConfig, q: Quantization): MemoryEstimate {
  const d = cfg.hidden;
  const embed = cfg.vocabSize * d * 4;
  const head = weightBytes(cfg.vocabSize, d, q);
  let total = embed + head + d * 4;
  let kv = 0;
  let largest = Math.max(embed, head);
  const add = (n: number, k: number) => {
    const b = weightBytes(n, k, q);
    total += b;
    largest = Math.max(largest, b);
  };
  for (const layer of cfg.layers) {
    const a = layer.attention;
    if (a.kind === "full") {
      const qDim = cfg.numHeads * cfg.headDim;
      const kvDim = a.kvHeads * cfg.headDim;
      add(qDim, d), add(kvDim, d), add(kvDim, d), add(d, qDim);
      total += d * 4;
      kv += 2 * kvDim * 4;
    } else if (a.kind === "linear") add(d, d), total += d * 4;
    const f = layer.ffn;
    if (f.kind === "swiglu") {
      add(f.intermediate, d), add(f.intermediate, d), add(d, f.intermediate), total += d * 4;
    } else if (f.kind === "linear") add(d, d), total += d * 4;
  }
  return { weightBytes: total, kvBytesPerToken: kv, largestTensorBytes: largest };
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
  q: Quantization,
  device: Device,
  opts: { sequences: number; maxBufferBytes?: number },
): MemoryEstimate {
  const est = estimateMemory(cfg, q);
  const kv = est.kvBytesPerToken * cfg.maxPositions * opts.sequences;
  if (device === "wasm" && est.weightBytes + kv > WASM_USABLE_BYTES) {
    const options = (["int8", "int4"] as const)
      .filter((alt) => alt !== q)
      .map((alt) => ({ alt, need: estimateMemory(cfg, alt).weightBytes + kv }))
      .filter((o) => o.need <= WASM_USABLE_BYTES)
      .map((o) => `--quantize ${o.alt} (${gb(o.need)})`);
    options.push("--device webgpu");
    throw new InputError(
      `the model needs ${gb(est.weightBytes)} of ${q === "none" ? "fp32" : q} weights and ${
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
      }); try --quantize int8 or int4`,
      "model",
    );
  }
  return est;
}
