/** The float type of a graph's weights and activations: fp16 halves the bytes a decode step reads. */
export type FloatType = "fp32" | "fp16";

/** How a graph stores its weights: float type, and weight-only quantization of the MatMul weights. */
/** Weight quantization of every MatMul weight. */
export type Quantization = "none" | "int8" | "int4";

export interface GraphOptions {
  dtype: FloatType;
  quantize: Quantization;
  /**
   * MatMulNBits' `accuracy_level`: 4 computes in int8 (activations quantized per block of 32), which
   * native onnxruntime's CPU kernels make several times faster than fp32 compute; 0 (the default)
   * leaves the choice to the provider.
   */
  accuracy?: 0 | 4;
  /**
   * MatMulNBits' weights per scale along K: 32 unless set (a weight whose K it does not divide takes
   * the largest of its halves down to 32 that does).
   */
  block?: number;
  /** int4 blocks with a fitted zero point each (MatMulNBits' zero_points) instead of the implicit 8. */
  asymmetric?: boolean;
  /**
   * Where quantized weights go through integer GEMMs instead of MatMulNBits (WASM, whose MatMulNBits
   * dequantizes every weight to fp32 on every call): int8 weights per output column, activations
   * rounded to int8 per row, MatMulInteger's int32 sums, and the embedding in int8 per row too.
   */
  integer?: boolean;
  /**
   * The embedding table in int8 per row (a scale a token) in a quantized graph: a token reads one row
   * of it, but an fp32 table is most of a quantized 1B model's bytes (1.05 GB of 128K x 2048), and
   * onnxruntime's mapped file of it becomes resident row by row as a server sees more tokens.
   */
  int8Embedding?: boolean;
}

/** Whether a graph in these options gathers its embeddings from the int8-per-row table. */
export const embedsInt8 = (g: GraphOptions): boolean =>
  g.quantize !== "none" && (g.integer === true || g.int8Embedding === true);

export const FLOAT_WEIGHTS: GraphOptions = { dtype: "fp32", quantize: "none" };

/**
 * How native onnxruntime (`--device cpu`) computes quantized weights. int8 compute (accuracy 4) is
 * faster at the 1B shape (int8's fp32 path has no kernel at all) and keeps the quality table's KL
 * (bench/results/2026-12-04-cpu-tiny-nas-accuracy-level.txt). Its kernel pays per block for each row
 * of a batch: 128 a block, with zero points fitted so that int4 keeps the error it had at 32
 * (bench/results/2026-12-05-cpu-llama-3.2-1b-int4-blocks.txt). The embedding is int8 per row, as the
 * integer path's (bench/results/2026-12-05-cpu-llama-3.2-1b-int8-embedding.txt).
 */
export const NATIVE_QUANTIZED = {
  accuracy: 4,
  block: 128,
  asymmetric: true,
  int8Embedding: true,
} as const satisfies Partial<
  GraphOptions
>;

/** `fp16`, `fp32+int4`: how the loaded weights are described to users and keyed in the weight cache. */
export function formatName(g: GraphOptions): string {
  return g.quantize === "none" ? g.dtype : `${g.dtype}+${g.quantize}`;
}

/** Every format by name, as `bench --formats` takes them. */
export const FORMAT_NAMES = ["fp32", "fp16", "fp32+int8", "fp32+int4", "fp16+int8", "fp16+int4"] as const;
export type FormatName = typeof FORMAT_NAMES[number];

export function parseFormatName(name: FormatName): GraphOptions {
  const [dtype, quantize = "none"] = name.split("+") as [FloatType, Quantization?];
  return { dtype, quantize };
}
