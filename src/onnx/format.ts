import type { Quantization } from "./quantize.ts";

/** The float type of a graph's weights and activations: fp16 halves the bytes a decode step reads. */
export type FloatType = "fp32" | "fp16";

/** How a graph stores its weights: float type, and weight-only quantization of the MatMul weights. */
export interface GraphOptions {
  dtype: FloatType;
  quantize: Quantization;
}

export const FLOAT_WEIGHTS: GraphOptions = { dtype: "fp32", quantize: "none" };

/** `fp16`, `fp32+int4`: how the loaded weights are described to users and keyed in the weight cache. */
export function formatName(g: GraphOptions): string {
  return g.quantize === "none" ? g.dtype : `${g.dtype}+${g.quantize}`;
}
