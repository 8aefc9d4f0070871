import type { Block, FfnBlock } from "../model/blocks.ts";
import type { Checkpoint, LinearWeights } from "../model/checkpoint.ts";
import { referenceForward, rmsNorm } from "../model/forward.ts";
import { applyPlan, type FusionHeal, groupKey, type InputMaps } from "./apply.ts";
import { NormalEquations } from "./linear_fit.ts";
import { type FusionPlan, planId } from "./plan.ts";

/**
 * Gradient-free healing of fused FFN groups, in two stages per group, each kept only where it lowers
 * the held-out loss (`lossesOf`, on text the fit never saw) beyond its noise (clearlyBetter), so
 * healing never makes a group worse.
 *
 * 1. Each member's INPUT. Fused, member j reads norm(x), the group's input, where the sequential model
 *    gave it norm(x_j), x_j = x + the members before it. Ridge least squares predicts norm(x_j) from
 *    norm(x), norm(x_j) ~ M_j norm(x) with M_j = I + C_j, and M_j is folded into member j's gate and up
 *    rows (W diag(g_j) M_j): the group stays ONE wide GEMM and costs nothing at inference. The first
 *    member reads x exactly and keeps its weights.
 * 2. The wide DOWN projection, refitted so that the group (reading its fitted inputs) reproduces the
 *    sequential group's output, each token's error scaled by 1/rms of that output (see downRows).
 *
 * Why not the obvious objective alone (the down projection fitted to the sequential output in plain
 * L2): measured on tiny-nas it raises held-out loss at every ridge, even where it halves the output
 * error, because a few tokens of very large norm dominate it (README, "Healing without training").
 *
 * Groups are healed in model order, each fitted with the groups before it already fused and healed, so
 * errors do not accumulate. Normal equations are accumulated in float64 over calibration windows
 * (memory O(width^2), not O(tokens x width)) and solved by Cholesky.
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
  /** The stage's objective per token, before and after (its own residual; see healPlan). */
  residual: { calibration: { before: number; after: number }; heldout: { before: number; after: number } };
  /** Held-out loss at each ridge tried. */
  tried: { ridge: number; loss: number }[];
  note?: string;
}

export interface HealGroupReport {
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

export interface HealInput {
  ckpt: Checkpoint;
  /** The unfused model's blocks. */
  blocks: Block[];
  plan: FusionPlan;
  /** Fitted linear attentions of the plan (applyPlan's `fits`). */
  fits: Map<number, LinearWeights>;
  calibration: number[][];
  heldout: number[][];
  /** Per-token held-out losses of a whole model's blocks, in a fixed token order (the caller runs them). */
  lossesOf(blocks: Block[]): Promise<Float64Array>;
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

/** One window's group input x and the sequential group's output, [t, hidden] each. */
interface GroupIo {
  t: number;
  x: Float64Array;
  out: Float64Array;
}

/**
 * One pass of the sequential group over windows: the normal equations of norm(x) against
 * norm(x_j) - norm(x) for members j >= 1, and each window's group input and output for the
 * down-projection stage.
 */
function sequentialPass(
  ckpt: Checkpoint,
  blocks: Block[],
  members: number[],
  windows: number[][],
  progress: (done: number) => void,
): { eq: NormalEquations; io: GroupIo[] } {
  const d = ckpt.config.hidden;
  const eps = ckpt.config.rmsEps;
  const k = members.length;
  const eq = new NormalEquations(d, (k - 1) * d);
  const last = members[k - 1];
  const io: GroupIo[] = [];
  windows.forEach((ids, w) => {
    const t = ids.length;
    const inputs = new Map<number, Float64Array>();
    let out: Float64Array | null = null;
    referenceForward(ckpt, blocks.slice(0, last + 1), ids, {
      logits: "none",
      onDelta: (i, delta, input) => {
        if (members.includes(i)) inputs.set(i, input);
        if (i === last) out = Float64Array.from(input, (v, j) => v + delta[j]);
      },
    });
    const x = inputs.get(members[0])!;
    const h = rmsNorm(x, null, t, d, eps);
    const y = new Float64Array(t * (k - 1) * d);
    members.slice(1).forEach((bi, j) => {
      const target = rmsNorm(inputs.get(bi)!, null, t, d, eps);
      for (let r = 0; r < t; r++) {
        for (let c = 0; c < d; c++) y[(r * (k - 1) + j) * d + c] = target[r * d + c] - h[r * d + c];
      }
    });
    eq.add(t, h, y);
    io.push({ t, x, out: out! });
    progress(w + 1);
  });
  return { eq, io };
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
 * Rows of the down-projection fit for one window: the fused block's wide activations a(x) and the part
 * of the sequential group's output its current down projection misses, out - x - W a(x), both scaled
 * by 1/rms(out) per token. The scaling is what makes this fit help: what the next layer reads is the
 * normalised stream, and unscaled L2 spends the fit on the few tokens of very large norm (measured:
 * unscaled, this refit raises held-out loss at every ridge tried).
 */
function downRows(block: FfnBlock, io: GroupIo, eps: number): { a: Float64Array; y: Float64Array } {
  const d = block.down.shape[0];
  const width = block.gate.shape[0];
  const { t, x, out } = io;
  const gate = block.gate.data;
  const up = block.up.data;
  const down = block.down.data;
  const h = rmsNorm(x, null, t, d, eps);
  const a = new Float64Array(t * width);
  const y = new Float64Array(t * d);
  for (let r = 0; r < t; r++) {
    const hr = r * d;
    const ar = r * width;
    for (let u = 0; u < width; u++) {
      let g = 0;
      let v = 0;
      const wu = u * d;
      for (let c = 0; c < d; c++) {
        g += gate[wu + c] * h[hr + c];
        v += up[wu + c] * h[hr + c];
      }
      a[ar + u] = (g / (1 + Math.exp(-g))) * v;
    }
    let ss = 0;
    for (let c = 0; c < d; c++) ss += out[hr + c] ** 2;
    const scale = 1 / Math.sqrt(ss / d + eps);
    for (let c = 0; c < d; c++) {
      let p = 0;
      const wc = c * width;
      for (let u = 0; u < width; u++) p += down[wc + u] * a[ar + u];
      y[hr + c] = scale * (out[hr + c] - x[hr + c] - p);
    }
    for (let u = 0; u < width; u++) a[ar + u] *= scale;
  }
  return { a, y };
}

/** Heals every FFN group of the plan in model order; returns the fitted weights and the report. */
export async function healPlan(input: HealInput): Promise<{ heal: FusionHeal; report: HealReport }> {
  const { ckpt, blocks, plan, fits } = input;
  const d = ckpt.config.hidden;
  const eps = ckpt.config.rmsEps;
  const variant = healVariant(plan);
  const groups = [...plan.ffn_groups].sort((a, b) => a[0] - b[0]);
  const heal: Required<FusionHeal> = { maps: new Map(), downs: new Map(), variant };
  const reports: HealGroupReport[] = [];
  const tokens = (ws: number[][]) => ws.reduce((n, w) => n + w.length, 0);
  const upTo = (g: number): FusionPlan => ({ ...plan, ffn_groups: groups.slice(0, g) });
  const score = async (model: Block[]): Promise<Scored> => {
    const losses = await input.lossesOf(model);
    return { losses, loss: losses.reduce((a, b) => a + b, 0) / losses.length };
  };
  const modelWith = (g: number, maps: InputMaps, downs: Map<string, Float32Array>) =>
    applyPlan(blocks, upTo(g + 1), "fused", fits, {
      maps: new Map([...heal.maps, ...maps]),
      downs: new Map([...heal.downs, ...downs]),
      variant,
    });
  for (const [g, layers] of groups.entries()) {
    const t0 = performance.now();
    const name = `ffn[${layers[0]}-${layers.at(-1)}]`;
    const key = groupKey(layers);
    // The model with the earlier groups fused and healed, this group's members still sequential.
    const before = applyPlan(blocks, upTo(g), "fused", fits, heal);
    const members = layers.map((l) =>
      before.findIndex((b) => b.kind === "ffn" && (b as FfnBlock).layers.length === 1 && b.layers[0] === l)
    );
    const total = input.calibration.length + input.heldout.length;
    const progress = (offset: number) => (done: number) =>
      input.onProgress?.(`heal ${name}: activations`, offset + done, total);
    const cal = sequentialPass(ckpt, before, members, input.calibration, progress(0));
    const held = sequentialPass(ckpt, before, members, input.heldout, progress(input.calibration.length));
    const unhealed = await score(modelWith(g, new Map(), new Map()));

    // Stage 1: each member's input.
    const zero = new Float64Array((layers.length - 1) * d * d);
    const tried: ({ ridge: number; c: Float64Array } & Scored)[] = [];
    for (const [i, ridge] of INPUT_RIDGES.entries()) {
      input.onProgress?.(`heal ${name}: input maps`, i, INPUT_RIDGES.length);
      const c = cal.eq.solve(ridge);
      tried.push({ ridge, c, ...await score(modelWith(g, inputMaps(layers, c, d), new Map())) });
    }
    const best = tried.reduce((a, b) => (b.loss < a.loss ? b : a));
    const inputKept = clearlyBetter(best.losses, unhealed.losses);
    const maps = inputKept ? inputMaps(layers, best.c, d) : new Map();
    const perToken = (eq: NormalEquations, c: Float64Array) => eq.residual(c) / eq.rows;
    const chosen = inputKept ? best.c : zero;
    const stages: HealStage[] = [{
      objective: "member_input",
      kept: inputKept,
      ridge: inputKept ? best.ridge : null,
      residual: {
        calibration: { before: perToken(cal.eq, zero), after: perToken(cal.eq, chosen) },
        heldout: { before: perToken(held.eq, zero), after: perToken(held.eq, chosen) },
      },
      tried: tried.map(({ ridge, loss }) => ({ ridge, loss })),
      ...(inputKept ? {} : { note: "no ridge lowered the held-out loss beyond its noise" }),
    }];
    let current = inputKept ? best : unhealed;

    // Stage 2: the wide down projection, with the members reading their fitted inputs.
    const fused = modelWith(g, maps, new Map()).find((b) =>
      b.kind === "ffn" && groupKey(b.layers) === key
    ) as FfnBlock;
    const width = fused.gate.shape[0];
    const downs = new Map<string, Float32Array>();
    const rows = cal.io.reduce((n, io) => n + io.t, 0);
    const skip = width * width * 8 > MAX_DOWN_GRAM_BYTES
      ? `its ${width} x ${width} Gram matrix would take ${
        (width * width * 8 / 2 ** 30).toFixed(1)
      } GiB (at most ${MAX_DOWN_GRAM_BYTES / 2 ** 30} GiB)`
      : rows < width / 2
      ? `${rows} calibration tokens are too few to refit a ${width}-wide projection (at least ${width / 2})`
      : null;
    if (skip) {
      stages.push({
        objective: "down_projection",
        kept: false,
        ridge: null,
        residual: { calibration: { before: NaN, after: NaN }, heldout: { before: NaN, after: NaN } },
        tried: [],
        note: `skipped: ${skip}`,
      });
    } else {
      const eq = new NormalEquations(width, d);
      cal.io.forEach((io, w) => {
        const { a, y } = downRows(fused, io, eps);
        eq.add(io.t, a, y);
        input.onProgress?.(`heal ${name}: down projection`, w + 1, cal.io.length);
      });
      // Held-out residual of a correction, from a direct pass (a second Gram would double the cost).
      const heldRows = held.io.map((io) => downRows(fused, io, eps));
      const heldResidual = (dw: Float64Array | null) => {
        let sum = 0;
        let rows = 0;
        for (const { a, y } of heldRows) {
          const t = y.length / d;
          rows += t;
          for (let r = 0; r < t; r++) {
            for (let c = 0; c < d; c++) {
              let p = 0;
              if (dw) { for (let u = 0; u < width; u++) p += dw[c * width + u] * a[r * width + u]; }
              sum += (y[r * d + c] - p) ** 2;
            }
          }
        }
        return sum / rows;
      };
      const w0 = fused.down.data;
      const triedDown: ({ ridge: number; dw: Float64Array } & Scored)[] = [];
      for (const ridge of DOWN_RIDGES) {
        const dw = eq.solve(ridge);
        const w = Float32Array.from(w0, (v, i) => v + dw[i]);
        triedDown.push({ ridge, dw, ...await score(modelWith(g, maps, new Map([[key, w]]))) });
      }
      const bestDown = triedDown.reduce((a, b) => (b.loss < a.loss ? b : a));
      const downKept = clearlyBetter(bestDown.losses, current.losses);
      if (downKept) {
        downs.set(key, Float32Array.from(w0, (v, i) => v + bestDown.dw[i]));
        current = bestDown;
      }
      const zeroDown = new Float64Array(d * width);
      stages.push({
        objective: "down_projection",
        kept: downKept,
        ridge: downKept ? bestDown.ridge : null,
        residual: {
          calibration: {
            before: eq.residual(zeroDown) / eq.rows,
            after: eq.residual(downKept ? bestDown.dw : zeroDown) / eq.rows,
          },
          heldout: { before: heldResidual(null), after: heldResidual(downKept ? bestDown.dw : null) },
        },
        tried: triedDown.map(({ ridge, loss }) => ({ ridge, loss })),
        ...(downKept ? {} : { note: "no ridge lowered the held-out loss further beyond its noise" }),
      });
    }
    for (const [l, m] of maps) heal.maps.set(l, m);
    for (const [k, w] of downs) heal.downs.set(k, w);
    reports.push({
      layers,
      healed: stages.some((s) => s.kept),
      stages,
      heldout_loss: { unhealed: unhealed.loss, healed: current.loss },
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
