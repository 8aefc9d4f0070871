import type { FfnBlock } from "../model/blocks.ts";
import type { ModelConfig } from "../model/config.ts";
import type { EncodedModel } from "./builder.ts";
import { DecoderEmitter } from "./decoder.ts";
import { FLOAT_WEIGHTS } from "./format.ts";
import { WeightCache } from "./weight_cache.ts";

/**
 * The statistics of healing's down-projection fit for one window, computed where the model runs:
 * inputs `x` (the group's input) and `out` (the sequential group's output), [T, hidden] fp32; outputs,
 * with a = the fused block's SwiGLU activations scaled by s = 1/rms(out) per token and y = s (out - x -
 * FFN(x)) what the block misses, `gram` = a^T a [width, width], `cross` = a^T y [width, hidden] and
 * `squares` = sum y^2. The host adds them up across windows in float64 (fusion/heal.ts): in fp32 a
 * window's sums are over T products only. At width 4608 a 256-token window's Gram takes 0.5 s in WASM
 * against 2.5 s for the float64 JS accumulation (measured here, same window).
 */
export function buildDownStatsGraph(
  cfg: Pick<ModelConfig, "hidden" | "rmsEps">,
  ffn: FfnBlock,
): EncodedModel {
  const e = new DecoderEmitter(cfg as ModelConfig, FLOAT_WEIGHTS, new WeightCache("fp32"));
  const g = e.g;
  const x = g.input("x", "float32", ["tokens", cfg.hidden]);
  const out = g.input("out", "float32", ["tokens", cfg.hidden]);
  const act = e.ffnActivations(x, ffn);
  const meanSquare = g.op("ReduceMean", [g.op("Mul", [out, out])], { axes: [-1], keepdims: 1 });
  const scale = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [meanSquare, g.scalar(cfg.rmsEps)])])]);
  const a = g.op("Mul", [act, scale]);
  const missed = g.op("Sub", [g.op("Sub", [out, x]), e.ffnDown(act, ffn)]);
  const y = g.op("Mul", [missed, scale]);
  const aT = g.op("Transpose", [a], { perm: [1, 0] });
  g.op("MatMul", [aT, a], {}, "gram");
  g.op("MatMul", [aT, y], {}, "cross");
  g.op("ReduceSum", [g.op("Mul", [y, y])], { keepdims: 0 }, "squares");
  const width = ffn.gate.shape[0];
  g.output("gram", "float32", [width, width]);
  g.output("cross", "float32", [width, cfg.hidden]);
  g.output("squares", "float32", []);
  return g.encode("fusedge_down_stats");
}
