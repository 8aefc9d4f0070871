import type { FfnBlock } from "../model/blocks.ts";
import type { ModelConfig } from "../model/config.ts";
import { type EncodedModel, GraphBuilder } from "./builder.ts";
import { DecoderEmitter } from "./decoder.ts";
import { FLOAT_WEIGHTS } from "./format.ts";
import { WeightCache } from "./weight_cache.ts";

/**
 * The statistics of healing's down-projection fit for one window, computed where the model runs:
 * inputs `x` (the group's input) and `out` (the sequential group's output), [T, hidden] fp32; outputs,
 * with a = the fused block's SwiGLU activations scaled by s = 1/rms(out) per token and y = s (out - x -
 * FFN(x)) what the block misses, `gram` = a^T a [width, width], `cross` = a^T y [width, hidden] and
 * `squares` = sum y^2. The host adds them up across windows in float64 (fusion/heal.ts): in fp32 a
 * window's sums are over T products only. onnxruntime computes a window's Gram several times faster
 * than the float64 JS accumulation it replaced (bench/results/2026-11-26-cpu-tiny-nas-heal-gather.txt).
 */
export function buildDownStatsGraph(
  cfg: Pick<ModelConfig, "hidden" | "rmsEps">,
  ffn: FfnBlock,
): EncodedModel {
  const e = new DecoderEmitter(cfg as ModelConfig, FLOAT_WEIGHTS, new WeightCache("fp32"));
  const g = e.g;
  const x = g.input("x", "float32", ["tokens", cfg.hidden]);
  const out = g.input("out", "float32", ["tokens", cfg.hidden]);
  const act = e.ffnActivations(e.rmsNorm(x, e.ffnGain(ffn), e.ffnNormName(ffn)), ffn);
  const scale = inverseRms(g, out, cfg.rmsEps);
  const a = g.op("Mul", [act, scale]);
  const missed = g.op("Sub", [g.op("Sub", [out, x]), e.ffnDown(act, ffn)]);
  const y = g.op("Mul", [missed, scale]);
  statistics(g, a, y, ffn.gate.shape[0], cfg.hidden);
  return g.encode("fusedge_down_stats");
}

/**
 * The statistics of healing's member-input fit (stage 1) for one window of a k-member FFN group:
 * inputs `x` (the group's input) and `member1`..`member{k-1}` (the sequential run's input to each later
 * member), [T, hidden] fp32; with h = x / rms(x) and y_j = member_j / rms(member_j) - h (norms without
 * their gains, which fusion/heal.ts folds in after), outputs `gram` = h^T h [hidden, hidden], `cross` =
 * h^T [y_1 .. y_{k-1}] [hidden, (k-1) hidden] and `squares` = sum y^2. At a 1B model's hidden size the
 * float64 JS accumulation took minutes a group at the default calibration tokens, four times that at an
 * 8B's (bench/results/2026-11-26-cpu-nemotron-nas-1b-heal-inputs.txt).
 */
export function buildInputStatsGraph(
  cfg: Pick<ModelConfig, "hidden" | "rmsEps">,
  members: number,
): EncodedModel {
  const g = new GraphBuilder();
  const unit = (v: string) => g.op("Mul", [v, inverseRms(g, v, cfg.rmsEps)]);
  const h = unit(g.input("x", "float32", ["tokens", cfg.hidden]));
  const ys = Array.from(
    { length: members - 1 },
    (_, j) => g.op("Sub", [unit(g.input(`member${j + 1}`, "float32", ["tokens", cfg.hidden])), h]),
  );
  const y = ys.length === 1 ? ys[0] : g.op("Concat", ys, { axis: 1 });
  statistics(g, h, y, cfg.hidden, (members - 1) * cfg.hidden);
  return g.encode("fusedge_input_stats");
}

/** 1/sqrt(mean(v^2) + eps) per row of v [T, n], shaped [T, 1]. */
function inverseRms(g: GraphBuilder, v: string, eps: number): string {
  const meanSquare = g.op("ReduceMean", [g.op("Mul", [v, v])], { axes: [-1], keepdims: 1 });
  return g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [meanSquare, g.scalar(eps)])])]);
}

/** A least-squares fit's statistics of rows a [T, n] and targets y [T, m]: outputs gram, cross, squares. */
function statistics(g: GraphBuilder, a: string, y: string, n: number, m: number): void {
  const aT = g.op("Transpose", [a], { perm: [1, 0] });
  g.op("MatMul", [aT, a], {}, "gram");
  g.op("MatMul", [aT, y], {}, "cross");
  g.op("ReduceSum", [g.op("Mul", [y, y])], { keepdims: 0 }, "squares");
  g.output("gram", "float32", [n, n]);
  g.output("cross", "float32", [n, m]);
  g.output("squares", "float32", []);
}
