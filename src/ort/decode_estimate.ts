import type { ModelConfig } from "../model/config.ts";
import { formatName, type GraphOptions, NATIVE_QUANTIZED } from "../onnx/format.ts";
import { estimateMemory } from "./memory.ts";
import type { Device } from "./ort.ts";

/**
 * Weight bytes a batch-1 decode step reads per second on the CPU paths, measured on the Llama-3.2-1B
 * shape on a 2-core x86 machine (bench/studies/cpu_paths.ts, all paths in one run:
 * bench/results/2026-12-06-cpu-llama-3.2-1b-paths-now.txt: WASM int8 1.36 GB a token at 2.3-2.7 tokens/s, native
 * int4 0.66 GB at 37-43), WASM fp32 on the same shape cut to 2 layers (it does not fit WASM's heap whole;
 * bench/results/2026-11-26-cpu-llama-1b-shape-2-layers-step.txt), native fp32 from
 * bench/results/2026-12-04-cpu-llama-3.2-1b-paths.txt. A step reads every weight but the embedding once,
 * so tokens/s is about this over the bytes: a guide for choosing a device, not a promise.
 */
const READ_BYTES_PER_SECOND = {
  wasm: { fp32: 26e9, quantized: 3.6e9 },
  cpu: { fp32: 35e9, quantized: 26e9 },
};

/** Below this, WASM is named as too slow to serve on and `--device cpu` is suggested. */
const ADVISE_BELOW_TOKENS_PER_SECOND = 10;

/** Weight bytes a token reads in this format, and the tokens/s a stream gets at the measured rate. */
function estimate(cfg: ModelConfig, g: GraphOptions, device: "wasm" | "cpu") {
  const bytes = estimateMemory(cfg, g).readBytesPerToken;
  return {
    bytes,
    tokensPerSecond: READ_BYTES_PER_SECOND[device][g.quantize === "none" ? "fp32" : "quantized"] / bytes,
  };
}

/**
 * For a model about to be served on WASM that would decode slower than 10 tokens/s: what to expect
 * there and on `--device cpu` (native onnxruntime, int4), with the figures behind both; null otherwise.
 */
export function decodeAdvice(cfg: ModelConfig, g: GraphOptions, device: Device): string | null {
  if (device !== "wasm") return null;
  const wasm = estimate(cfg, g, "wasm");
  if (wasm.tokensPerSecond >= ADVISE_BELOW_TOKENS_PER_SECOND) return null;
  const cpu = estimate(cfg, { dtype: "fp32", quantize: "int4", ...NATIVE_QUANTIZED }, "cpu");
  const gb = (b: number) => (b / 1e9).toFixed(2);
  return `WASM decodes this model at about ${wasm.tokensPerSecond.toFixed(1)} tokens/s a stream (${
    gb(wasm.bytes)
  } GB of ${formatName(g)} weights read a token; measured on 2 x86 cores); --device cpu --quantize int4 ` +
    `(native onnxruntime) reads ${gb(cpu.bytes)} GB a token: about ${
      cpu.tokensPerSecond.toFixed(0)
    } tokens/s ` +
    "on the same cores";
}
