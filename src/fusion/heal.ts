import { type Block, type FfnBlock, layerOf } from "../model/blocks.ts";
import type { Checkpoint, LinearWeights } from "../model/checkpoint.ts";
import { referenceForward, rmsNorm, swigluActivations } from "../model/forward.ts";
import { concatColumns, splitColumns } from "../model/tensor.ts";
import { applyPlan, type FusionHeal, groupKey, type InputMaps } from "./apply.ts";
import { NormalEquations } from "./linear_fit.ts";
import { blockGroups, type FusionPlan, planId } from "./plan.ts";

/**
 * Gradient-free healing of a plan's fused FFN groups and block groups, each stage kept only where it
 * lowers the held-out loss (`lossesOf`, on text the fit never saw) beyond its noise (clearlyBetter),
 * so healing never makes a group worse. FFN groups get two stages:
 *
 * 1. Each member's INPUT. Fused, member j reads norm(x), the group's input, where the sequential model
 *    gave it norm(x_j), x_j = x + the members before it. Ridge least squares predicts norm(x_j) from
 *    norm(x), norm(x_j) ~ M_j norm(x) with M_j = I + C_j, and M_j is folded into member j's gate and up
 *    rows (W diag(g_j) M_j): the group stays ONE wide GEMM and costs nothing at inference. The first
 *    member reads x exactly and keeps its weights.
 * 2. The wide DOWN projection, refitted so that the group (reading its fitted inputs) reproduces the
 *    sequential group's output, each token's error scaled by 1/rms of that output (see scaledRows).
 *
 * Block groups get stage 2 for their members' FFN down projections together (blockMemberPass).
 *
 * Why not the obvious objective alone (the down projection fitted to the sequential output in plain
 * L2): measured on tiny-nas it raises held-out loss at every ridge, even where it halves the output
 * error, because a few tokens of very large norm dominate it (docs/fusion.md, "Healing without training").
 *
 * Groups are healed in model order, each fitted with the groups before it already fused and healed, so
 * errors do not accumulate. Normal equations are accumulated in float64 over calibration windows
 * (memory O(width^2), not O(tokens x width)) and solved by Cholesky. What a fit reads of the model (the
 * residual streams, a fused FFN's per-window statistics) is computed by a HealRunner through
 * onnxruntime, in fp32 within a window.
 */

/** Ridge strengths tried for the members' input maps, relative to mean(diag(norm(x)^T norm(x))). */
export const INPUT_RIDGES = [1e-4, 1e-3, 1e-2, 1e-1, 1];

/** Ridge strengths tried for the down projection's correction (stronger: it has width x hidden unknowns). */
export const DOWN_RIDGES = [1e-2, 1e-1, 1, 10];

/**
 * The down-projection stage accumulates a width x width Gram matrix in float64: above this it is skipped
 * (a 1B model's fused groups are 16k-32k wide) and the report says so.
 */
export const MAX_DOWN_GRAM_BYTES = 1 << 30;

/** One fitting stage of a group: what was tried, what was kept. */
export interface HealStage {
  objective: "member_input" | "down_projection";
  kept: boolean;
  /** The ridge kept (relative); null when the stage changed nothing. */
  ridge: number | null;
  /**
   * The stage's own residual per token, before and after: ||norm(x_j) - M_j norm(x)||^2 summed over
   * members, or the 1/rms-scaled output error of the group.
   */
  residual: { calibration: { before: number; after: number }; heldout: { before: number; after: number } };
  /** Held-out loss at each ridge tried. */
  tried: { ridge: number; loss: number }[];
  note?: string;
}

export interface HealGroupReport {
  kind: "ffn" | "block";
  layers: number[];
  /** Whether any stage changed the group's weights. */
  healed: boolean;
  stages: HealStage[];
  /** Held-out loss with this group fused (the groups before it healed): unhealed and as served. */
  heldout_loss: { unhealed: number; healed: number };
  ms: number;
}

export interface HealReport {
  plan: string;
  calibration_tokens: number;
  heldout_tokens: number;
  groups: HealGroupReport[];
}

/**
 * What healing runs through the model (instance/heal_runner.ts, onnxruntime): this module only fits.
 * Gathered through onnxruntime, a window's streams and statistics cost a seventh of the float64
 * reference forward and JS Gram they replaced (bench/studies/heal_gather.ts).
 */
export interface HealRunner {
  /** Per-token held-out losses of a whole model's blocks, in a fixed token order. */
  lossesOf(blocks: Block[]): Promise<Float64Array>;
  /**
   * Each window's residual streams entering blocks `taps` of `blocks` (`blocks.length`: after the
   * last), [t, hidden] fp32, in the order of `taps`.
   */
  streams(
    blocks: Block[],
    windows: number[][],
    taps: number[],
    each: (w: number, streams: Float32Array[]) => void | Promise<void>,
  ): Promise<void>;
  /** The down-projection fit's statistics of a fused FFN for each window (see scaledRows). */
  downStatistics(
    ffn: FfnBlock,
    io: GroupIo[],
    each: (w: number, s: WindowStatistics) => void,
  ): Promise<void>;
  /**
   * Runs `use` with `of`, which gives the member-input fit's statistics of one window of a `members`-FFN
   * group from its input x and the sequential run's inputs to members 1.. (see sequentialPass).
   */
  inputStatistics<T>(
    members: number,
    use: (of: InputStatisticsOf) => Promise<T>,
  ): Promise<T>;
}

/** One window's member-input statistics from the group's input x and the inputs to members 1... */
export type InputStatisticsOf = (x: Float32Array, inputs: Float32Array[]) => Promise<WindowStatistics>;

/** One window's normal-equation statistics, fp32 (summed across windows in float64 by NormalEquations). */
export interface WindowStatistics {
  gram: Float32Array;
  cross: Float32Array;
  squares: number;
}

export interface HealInput extends HealRunner {
  ckpt: Checkpoint;
  /** The unfused model's blocks. */
  blocks: Block[];
  plan: FusionPlan;
  /** Fitted linear attentions of the plan (applyPlan's `fits`). */
  fits: Map<number, LinearWeights>;
  calibration: number[][];
  heldout: number[][];
  onProgress?(stage: string, done: number, total: number): void;
}

/** The variant name healed fused blocks carry: weights of different fits never share a cache entry. */
export function healVariant(plan: FusionPlan): string {
  const id = planId(plan);
  return id.slice(id.indexOf("heal("));
}

/** A candidate's held-out losses, per token and their mean. */
interface Scored {
  losses: Float64Array;
  loss: number;
}

/**
 * Whether `candidate` is better than `current` beyond noise: its mean per-token loss is lower by more
 * than two standard errors of the paired per-token differences. A fit that only wins on the sampling
 * noise of a small held-out slice (measured: the down projection of a small group on 1024 calibration
 * tokens) is not kept.
 */
export function clearlyBetter(candidate: Float64Array, current: Float64Array): boolean {
  const n = candidate.length;
  let sum = 0;
  let squares = 0;
  for (let i = 0; i < n; i++) {
    const diff = candidate[i] - current[i];
    sum += diff;
    squares += diff * diff;
  }
  const mean = sum / n;
  const variance = Math.max(0, squares / n - mean * mean) * (n / Math.max(1, n - 1));
  return mean < -2 * Math.sqrt(variance / n);
}

/** One window's group input x and the sequential group's output, [t, hidden] each (fp32, as gathered). */
export interface GroupIo {
  t: number;
  x: Float32Array;
  out: Float32Array;
}

/**
 * One pass of the sequential group over windows (blocks `members[0]` to `members.at(-1)`): each
 * window's group input and output for the down-projection stage and, for an FFN group, the normal
 * equations of norm(x) against norm(x_j) - norm(x) for members j >= 1 (norms without gains).
 */
async function sequentialPass(
  input: HealInput,
  blocks: Block[],
  members: number[],
  windows: number[][],
  progress: (done: number) => void,
  memberInputs: boolean,
): Promise<{ eq: NormalEquations | null; io: GroupIo[] }> {
  const d = input.ckpt.config.hidden;
  const k = members.length;
  const eq = memberInputs ? new NormalEquations(d, (k - 1) * d) : null;
  const io: GroupIo[] = [];
  const pass = (stats?: InputStatisticsOf) =>
    input.streams(blocks, windows, [...members, members[k - 1] + 1], async (w, streams) => {
      const t = windows[w].length;
      if (eq && stats) {
        const s = await stats(streams[0], streams.slice(1, k));
        eq.addStatistics(t, s.gram, s.cross, s.squares);
      }
      io.push({ t, x: streams[0], out: streams[k] });
      progress(w + 1);
    });
  await (eq ? input.inputStatistics(k, pass) : pass());
  return { eq, io };
}

/**
 * The float64 rows whose normal equations the member-input statistics graph sums for one window of t
 * tokens (onnx/heal_graph.ts; bench/studies/heal_gather.ts and the tests measure that graph against them):
 * h = norm(x) [t, d] and y [t, (k-1) d], row r holding norm(x_j) - norm(x) for members j = 1.. in order.
 */
export function memberInputRows(x: Float32Array, inputs: Float32Array[], t: number, eps: number) {
  const d = x.length / t;
  const k1 = inputs.length;
  const h = rmsNorm(Float64Array.from(x), null, t, d, eps);
  const y = new Float64Array(t * k1 * d);
  inputs.forEach((xj, j) => {
    const target = rmsNorm(Float64Array.from(xj), null, t, d, eps);
    for (let r = 0; r < t; r++) {
      for (let c = 0; c < d; c++) y[(r * k1 + j) * d + c] = target[r * d + c] - h[r * d + c];
    }
  });
  return { h, y };
}

/** M_j = I + C_j for members 1..k-1 from the stacked solution C [(k-1) d, d]. */
function inputMaps(layers: number[], c: Float64Array, d: number): InputMaps {
  return new Map(
    layers.slice(1).map((layer, j) => {
      const m = c.slice(j * d * d, (j + 1) * d * d);
      for (let i = 0; i < d; i++) m[i * d + i] += 1;
      return [layer, m];
    }),
  );
}

/**
 * The ridge of `ridges` whose fit scores the lowest held-out loss, and every ridge's loss. Only the best
 * fit is kept while the others are scored: at real widths each one is hundreds of megabytes.
 */
async function bestRidge<F>(
  ridges: number[],
  fit: (ridge: number, i: number) => F,
  scoreOf: (fit: F) => Promise<Scored>,
): Promise<{ ridge: number; fit: F; scored: Scored; tried: { ridge: number; loss: number }[] }> {
  let best: { ridge: number; fit: F; scored: Scored } | null = null;
  const tried: { ridge: number; loss: number }[] = [];
  for (const [i, ridge] of ridges.entries()) {
    const f = fit(ridge, i);
    const scored = await scoreOf(f);
    tried.push({ ridge, loss: scored.loss });
    if (!best || scored.loss < best.scored.loss) best = { ridge, fit: f, scored };
  }
  return { ...best!, tried };
}

/**
 * Rows of a down-projection fit for one window: activations a [t, width] and what the group's current
 * computation `predicted` misses of the sequential output, out - x - predicted, both scaled by 1/rms(out)
 * per token (a fused FFN's are computed by onnxruntime the same way, onnx/heal_graph.ts). The scaling
 * is what makes this fit help: what the next layer reads is the normalised stream, and unscaled L2
 * spends the fit on the few tokens of very large norm (measured: unscaled, this refit raises held-out
 * loss at every ridge tried).
 */
export function scaledRows(io: GroupIo, a: Float64Array, predicted: Float64Array, eps: number) {
  const { t, x, out } = io;
  const d = x.length / t;
  const width = a.length / t;
  const y = new Float64Array(t * d);
  for (let r = 0; r < t; r++) {
    let ss = 0;
    for (let c = 0; c < d; c++) ss += out[r * d + c] ** 2;
    const scale = 1 / Math.sqrt(ss / d + eps);
    for (let c = 0; c < d; c++) y[r * d + c] = scale * (out[r * d + c] - x[r * d + c] - predicted[r * d + c]);
    for (let u = 0; u < width; u++) a[r * width + u] *= scale;
  }
  return { a, y };
}

/** A refitted down projection [hidden, width] and its held-out losses. */
interface DownFit {
  stage: HealStage;
  kept: { weights: Float32Array; scored: Scored } | null;
}

/**
 * The down-projection stage shared by FFN and block groups: ridge fits of a correction to `w0` on the
 * calibration windows' normal equations (`equations` adds those of some windows to `eq`, reporting
 * each window done), each scored by held-out loss through `candidate`, kept when clearly better than
 * `current`. Skipped, with the reason, when the Gram would pass MAX_DOWN_GRAM_BYTES or the calibration
 * tokens are fewer than half the width.
 */
async function downStage(o: {
  w0: Float32Array;
  width: number;
  d: number;
  cal: GroupIo[];
  held: GroupIo[];
  equations(io: GroupIo[], eq: NormalEquations, done: (w: number) => void): Promise<void>;
  candidate(weights: Float32Array): Promise<Scored>;
  current: Scored;
  progress(done: number, total: number): void;
}): Promise<DownFit> {
  const { width, d } = o;
  const rows = o.cal.reduce((n, io) => n + io.t, 0);
  const skip = width * width * 8 > MAX_DOWN_GRAM_BYTES
    ? `its ${width} x ${width} Gram matrix would take ${
      (width * width * 8 / 2 ** 30).toFixed(1)
    } GiB (at most ${MAX_DOWN_GRAM_BYTES / 2 ** 30} GiB)`
    : rows < width / 2
    ? `${rows} calibration tokens are too few to refit a ${width}-wide projection (at least ${width / 2})`
    : null;
  if (skip) return { stage: skippedStage("down_projection", skip), kept: null };
  const total = o.cal.length + o.held.length;
  const eq = new NormalEquations(width, d);
  await o.equations(o.cal, eq, (w) => o.progress(w + 1, total));
  // The held-out slice's own statistics give its residuals (it is a quarter of the calibration's size
  // by default, and gathered the same way).
  const heldEq = new NormalEquations(width, d);
  await o.equations(o.held, heldEq, (w) => o.progress(o.cal.length + w + 1, total));
  const best = await bestRidge(
    DOWN_RIDGES,
    (ridge) => {
      const dw = eq.solve(ridge);
      return { dw, weights: Float32Array.from(o.w0, (v, i) => v + dw[i]) };
    },
    (f) => o.candidate(f.weights),
  );
  const kept = clearlyBetter(best.scored.losses, o.current.losses);
  const zero = new Float64Array(d * width);
  return {
    stage: {
      objective: "down_projection",
      kept,
      ridge: kept ? best.ridge : null,
      residual: {
        calibration: {
          before: eq.residual(zero) / eq.rows,
          after: eq.residual(kept ? best.fit.dw : zero) / eq.rows,
        },
        heldout: {
          before: heldEq.residual(zero) / heldEq.rows,
          after: heldEq.residual(kept ? best.fit.dw : zero) / heldEq.rows,
        },
      },
      tried: best.tried,
      ...(kept ? {} : { note: "no ridge lowered the held-out loss further beyond its noise" }),
    },
    kept: kept ? { weights: best.fit.weights, scored: best.scored } : null,
  };
}

/** Each member's contribution to a block group computed from the group's input: its total delta and its FFN's activations. */
function blockMemberPass(
  ckpt: Checkpoint,
  member: Block[],
  ids: number[],
  x: Float64Array,
  eps: number,
): { delta: Float64Array; ffn: FfnBlock | null; a: Float64Array | null } {
  const t = ids.length;
  const delta = new Float64Array(x.length);
  let a: Float64Array | null = null;
  const ffn = (member.find((b) => b.kind === "ffn") as FfnBlock | undefined) ?? null;
  referenceForward(ckpt, member, ids, {
    start: { block: 0, x },
    logits: "none",
    onDelta: (i, d, input) => {
      for (let k = 0; k < d.length; k++) delta[k] += d[k];
      if (member[i] === ffn) a = swigluActivations(input, ffn, t, x.length / t, eps);
    },
  });
  return { delta, ffn, a };
}

/** One group of the plan, FFN or block, in model order. */
interface PlanGroup {
  kind: "ffn" | "block";
  layers: number[];
}

/** A stage that did not run, and why: kept nothing, fitted nothing. */
function skippedStage(objective: HealStage["objective"], why: string): HealStage {
  const none = { before: NaN, after: NaN };
  return {
    objective,
    kept: false,
    ridge: null,
    residual: { calibration: none, heldout: none },
    tried: [],
    note: `skipped: ${why}`,
  };
}

/** One group's pass over the model: what its fits read, and how a candidate of it is scored. */
interface GroupHealing {
  input: HealInput;
  layers: number[];
  name: string;
  /** The model with the earlier groups fused and healed, this group's layers still sequential. */
  before: Block[];
  cal: { eq: NormalEquations | null; io: GroupIo[] };
  held: { eq: NormalEquations | null; io: GroupIo[] };
  /** The model up to this group fused, with the fits so far and `extra`. */
  modelWith(extra?: Partial<FusionHeal>): Block[];
  score(model: Block[]): Promise<Scored>;
  unhealed: Scored;
  downProgress(done: number, all: number): void;
  /** Where the kept fits go. */
  heal: Required<FusionHeal>;
}

/** An FFN group: each member's input (stage 1), then the wide down projection (stage 2). */
async function healFfnGroup(h: GroupHealing): Promise<{ stages: HealStage[]; current: Scored }> {
  const { input, layers, name, cal, held, unhealed } = h;
  const d = input.ckpt.config.hidden;
  const stages: HealStage[] = [];
  let current = unhealed;
  // Stage 1: each member's input.
  const zero = new Float64Array((layers.length - 1) * d * d);
  const best = await bestRidge(
    INPUT_RIDGES,
    (ridge, i) => {
      input.onProgress?.(`heal ${name}: input maps`, i, INPUT_RIDGES.length);
      const c = cal.eq!.solve(ridge);
      return { c, maps: inputMaps(layers, c, d) };
    },
    (f) => h.score(h.modelWith({ maps: f.maps })),
  );
  const inputKept = clearlyBetter(best.scored.losses, unhealed.losses);
  const maps: InputMaps = inputKept ? best.fit.maps : new Map();
  const perToken = (eq: NormalEquations, c: Float64Array) => eq.residual(c) / eq.rows;
  const chosen = inputKept ? best.fit.c : zero;
  stages.push({
    objective: "member_input",
    kept: inputKept,
    ridge: inputKept ? best.ridge : null,
    residual: {
      calibration: { before: perToken(cal.eq!, zero), after: perToken(cal.eq!, chosen) },
      heldout: { before: perToken(held.eq!, zero), after: perToken(held.eq!, chosen) },
    },
    tried: best.tried,
    ...(inputKept ? {} : { note: "no ridge lowered the held-out loss beyond its noise" }),
  });
  if (inputKept) current = best.scored;
  // Stage 2: the wide down projection, with the members reading their fitted inputs.
  const key = groupKey(layers);
  const fused = h.modelWith({ maps }).find((b) => b.kind === "ffn" && groupKey(b.layers) === key) as FfnBlock;
  const fit = await downStage({
    w0: fused.down.data,
    width: fused.gate.shape[0],
    d,
    cal: cal.io,
    held: held.io,
    equations: (ios, eq, done) =>
      input.downStatistics(fused, ios, (w, st) => {
        eq.addStatistics(ios[w].t, st.gram, st.cross, st.squares);
        done(w);
      }),
    candidate: (w) => h.score(h.modelWith({ maps, downs: new Map([[key, w]]) })),
    current,
    progress: h.downProgress,
  });
  stages.push(fit.stage);
  for (const [l, m] of maps) h.heal.maps.set(l, m);
  if (fit.kept) {
    h.heal.downs.set(key, fit.kept.weights);
    current = fit.kept.scored;
  }
  return { stages, current };
}

/**
 * A block group: each member layer computed from the group's input; its FFN's down projection
 * refitted (all members' together), the rest of each block as it is.
 */
async function healBlockGroup(h: GroupHealing): Promise<{ stages: HealStage[]; current: Scored }> {
  const { input, layers, before, cal, held, unhealed } = h;
  const d = input.ckpt.config.hidden;
  const eps = input.ckpt.config.rmsEps;
  const memberBlocks = layers.map((l) => before.filter((b) => layerOf(b) === l));
  const ffns = memberBlocks.map((m) => (m.find((b) => b.kind === "ffn") as FfnBlock | undefined) ?? null);
  if (ffns.every((f) => f === null)) {
    return {
      stages: [skippedStage("down_projection", "no member of the group has a SwiGLU FFN")],
      current: unhealed,
    };
  }
  const widths = ffns.map((f) => f?.down.shape[1] ?? 0);
  const split = (w: Float32Array) =>
    new Map(splitColumns(w, d, widths).flatMap((m, j) => (ffns[j] ? [[layers[j], m] as const] : [])));
  const windowsOf = new Map<GroupIo, number[]>([
    ...cal.io.map((io, i) => [io, input.calibration[i]] as const),
    ...held.io.map((io, i) => [io, input.heldout[i]] as const),
  ]);
  const fit = await downStage({
    w0: concatColumns(ffns.map((f) => f?.down.data ?? new Float32Array(0)), d),
    width: widths.reduce((a, b) => a + b, 0),
    d,
    cal: cal.io,
    held: held.io,
    equations: (ios, eq, done) => {
      for (const [w, io] of ios.entries()) {
        const x = Float64Array.from(io.x);
        const passes = memberBlocks.map((m) => blockMemberPass(input.ckpt, m, windowsOf.get(io)!, x, eps));
        const a = concatColumns(passes.map((p) => p.a ?? new Float64Array(0)), io.t);
        const predicted = new Float64Array(io.t * d);
        for (const p of passes) for (let k = 0; k < predicted.length; k++) predicted[k] += p.delta[k];
        const { y } = scaledRows(io, a, predicted, eps);
        eq.add(io.t, a, y);
        done(w);
      }
      return Promise.resolve();
    },
    candidate: (w) => h.score(h.modelWith({ blockDowns: split(w) })),
    current: unhealed,
    progress: h.downProgress,
  });
  if (!fit.kept) return { stages: [fit.stage], current: unhealed };
  for (const [l, w] of split(fit.kept.weights)) h.heal.blockDowns.set(l, w);
  return { stages: [fit.stage], current: fit.kept.scored };
}

/** Heals every FFN and block group of the plan in model order; returns the fitted weights and the report. */
export async function healPlan(input: HealInput): Promise<{ heal: FusionHeal; report: HealReport }> {
  const { blocks, plan, fits } = input;
  const variant = healVariant(plan);
  const groups: PlanGroup[] = [
    ...plan.ffn_groups.map((layers) => ({ kind: "ffn" as const, layers })),
    ...blockGroups(plan).map((layers) => ({ kind: "block" as const, layers })),
  ].sort((a, b) => a.layers[0] - b.layers[0]);
  const heal: Required<FusionHeal> = { maps: new Map(), downs: new Map(), blockDowns: new Map(), variant };
  const reports: HealGroupReport[] = [];
  const tokens = (ws: number[][]) => ws.reduce((n, w) => n + w.length, 0);
  // The plan with its first g groups applied (the rest of the model unfused).
  const upTo = (g: number): FusionPlan => {
    const first = groups.slice(0, g);
    const ffn = first.filter((x) => x.kind === "ffn").map((x) => x.layers);
    const blk = first.filter((x) => x.kind === "block").map((x) => x.layers);
    return plan.version === 2
      ? { ...plan, ffn_groups: ffn, block_groups: blk }
      : { ...plan, ffn_groups: ffn };
  };
  const score = async (model: Block[]): Promise<Scored> => {
    const losses = await input.lossesOf(model);
    return { losses, loss: losses.reduce((a, b) => a + b, 0) / losses.length };
  };
  for (const [g, group] of groups.entries()) {
    const t0 = performance.now();
    const { layers } = group;
    const name = `${group.kind === "ffn" ? "ffn" : "blk"}[${layers[0]}-${layers.at(-1)}]`;
    const before = applyPlan(blocks, upTo(g), "fused", fits, heal);
    const inGroup = before.map((b, i) => ({ b, i })).filter(({ b }) => layers.includes(layerOf(b) ?? -1));
    const members = group.kind === "ffn"
      ? layers.map((l) => inGroup.find(({ b }) => b.kind === "ffn" && b.layers[0] === l)!.i)
      : [inGroup[0].i, inGroup.at(-1)!.i];
    const total = input.calibration.length + input.heldout.length;
    const progress = (offset: number) => (done: number) =>
      input.onProgress?.(`heal ${name}: activations`, offset + done, total);
    const ffn = group.kind === "ffn";
    const cal = await sequentialPass(input, before, members, input.calibration, progress(0), ffn);
    const held = await sequentialPass(
      input,
      before,
      members,
      input.heldout,
      progress(input.calibration.length),
      ffn,
    );
    const modelWith = (extra: Partial<FusionHeal> = {}) =>
      applyPlan(blocks, upTo(g + 1), "fused", fits, {
        maps: new Map([...heal.maps, ...extra.maps ?? []]),
        downs: new Map([...heal.downs, ...extra.downs ?? []]),
        blockDowns: new Map([...heal.blockDowns, ...extra.blockDowns ?? []]),
        variant,
      });
    const healing: GroupHealing = {
      input,
      layers,
      name,
      before,
      cal,
      held,
      modelWith,
      score,
      unhealed: await score(modelWith()),
      downProgress: (done, all) => input.onProgress?.(`heal ${name}: down projection`, done, all),
      heal,
    };
    const { stages, current } = ffn ? await healFfnGroup(healing) : await healBlockGroup(healing);
    reports.push({
      kind: group.kind,
      layers,
      healed: stages.some((s) => s.kept),
      stages,
      heldout_loss: { unhealed: healing.unhealed.loss, healed: current.loss },
      ms: performance.now() - t0,
    });
  }
  return {
    heal,
    report: {
      plan: planId(plan),
      calibration_tokens: tokens(input.calibration),
      heldout_tokens: tokens(input.heldout),
      groups: reports,
    },
  };
}
