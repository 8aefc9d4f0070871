import { z } from "zod";
import { PRESETS } from "../bench/shapes.ts";
import { FORMAT_NAMES } from "../onnx/format.ts";

/** A benchmark request: the body of POST /bench and the flags of `bench`. */
export const benchRequest = z.strictObject({
  preset: z.enum(Object.keys(PRESETS) as [keyof typeof PRESETS]).optional()
    .describe("a preset FFN shape instead of the model's own layers"),
  k: z.number().int().min(2).max(16).default(4).describe("FFN layers fused"),
  tokens: z.array(z.number().int().min(1).max(512)).min(1).max(8).default([1, 8, 32, 128])
    .describe("tokens per FFN run"),
  dtype: z.enum(["auto", "fp32", "fp16"]).default("auto").describe(
    "float type of the WGSL kernels' and WebGPU graphs' weights (auto: fp16 with shader-f16)",
  ),
  decode_tokens: z.number().int().min(2).max(1000).default(64).describe("tokens per decode round"),
  rounds: z.number().int().min(3).max(50).default(5).describe("alternating rounds per measurement"),
  quantize: z.enum(["none", "int8", "int4"]).default("none").describe(
    "weight format of the onnxruntime graphs",
  ),
  formats: z.array(z.enum([...FORMAT_NAMES, "all"])).max(7).optional().describe(
    "serve the model end to end in these weight formats (all: every one the device supports): " +
      "build, swap to the fused group, decode both, peak memory",
  ),
  batch: z.array(z.number().int().min(1).max(64)).min(1).max(6).optional().describe(
    "decode batch sizes: tokens/s of the unfused model and the fused plan at each (the cost axis)",
  ),
  constrained: z.boolean().default(false).describe(
    "with batch: also decode each case under a grammar (every token masked by xgrammar), alternated " +
      "with the unconstrained one: what constrained decoding costs",
  ),
  frontier: z.boolean().default(false).describe(
    "also decode each budget's best plan of the server's last analysis (POST /bench only): " +
      "the measured speed-up the dashboard's frontier chart plots",
  ),
  skip_wasm: z.boolean().default(false).describe(
    "leave out the decode on the WASM fallback that a webgpu or cpu run reports beside its own " +
      "(at 1B its rounds take minutes)",
  ),
  native: z.boolean().default(false).describe(
    "also decode with native onnxruntime on the CPU (fetches onnxruntime-node)",
  ),
});

export type BenchRequest = z.infer<typeof benchRequest>;
