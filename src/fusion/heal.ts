import type { Block, FfnBlock } from "../model/blocks.ts";
import type { Checkpoint, LinearWeights } from "../model/checkpoint.ts";
import { referenceForward, rmsNorm } from "../model/forward.ts";
import { applyPlan, type FusionHeal, type InputMaps } from "./apply.ts";
import { NormalEquations } from "./linear_fit.ts";
import { type FusionPlan, planId } from "./plan.ts";

/**
 * Gradient-free healing of fused FFN groups by fitting each member's INPUT.
 *
 * Fusing a run makes every member j read norm(x), the group's input, where the sequential model gave
 * it norm(x_j), x_j = x + the members before it. Healing predicts norm(x_j) from norm(x) by ridge
 * least squares, norm(x_j) ~ M_j norm(x) with M_j = I + C_j, and folds M_j into member j's gate and
 * up rows (W diag(g_j) M_j): the group stays ONE wide GEMM and costs nothing at inference. The first
 * member reads x exactly and keeps its weights.
 *
 * Why this objective and not the obvious one (refitting the wide down projection to the sequential
 * output, plain L2 in the residual stream): measured on tiny-nas, that refit halves the group's
 * output error on held-out tokens and still raises held-out loss at every ridge strength tried (the
 * error it removes is not the error the rest of the network reads); fitting the members' inputs lowers
 * it (README, "Healing").
 *
 * Groups are healed in model order, each fitted with the groups before it already fused and healed,
 * so errors do not accumulate. The ridge strength is chosen by the held-out loss (`lossOf`, text the
 * fit never saw); a group whose best healed loss is not below its unhealed loss stays unhealed.
 */

/** Ridge strengths tried, relative to mean(diag(norm(x)^T norm(x))). */
export const HEAL_RIDGES = [1e-4, 1e-3, 1e-2, 1e-1, 1];

export interface HealGroupReport {
  layers: number[];
  objective: "member_input";
  healed: boolean;
  /** The ridge chosen (relative); null when the group stays unhealed. */
  ridge: number | null;
  /** Sum over members of ||norm(x_j) - M_j norm(x)||^2 per token, M_j = I (before) and fitted (after). */
  residual: { calibration: { before: number; after: number }; heldout: { before: number; after: number } };
  /** Held-out loss with this group fused: unhealed, each ridge tried, and the one kept. */
  heldout_loss: { unhealed: number; healed: number; tried: { ridge: number; loss: number }[] };
  ms: number;
  /** Why a group stays unhealed. */
  note?: string;
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
  /** Held-out loss of a whole model's blocks (the caller runs them). */
  lossOf(blocks: Block[]): Promise<number>;
  onProgress?(stage: string, done: number, total: number): void;
}

/** The variant name healed fused blocks carry: weights of different fits never share a cache entry. */
export function healVariant(plan: FusionPlan): string {
  const id = planId(plan);
  return id.slice(id.indexOf("heal("));
}

/** Statistics of one group's member inputs over windows: norm(x) against norm(x_j) - norm(x), j >= 1. */
function memberInputStats(
  ckpt: Checkpoint,
  blocks: Block[],
  members: number[],
  windows: number[][],
  progress: (done: number) => void,
): NormalEquations {
  const d = ckpt.config.hidden;
  const eps = ckpt.config.rmsEps;
  const k = members.length;
  const eq = new NormalEquations(d, (k - 1) * d);
  const last = members[k - 1];
  windows.forEach((ids, w) => {
    const t = ids.length;
    const inputs = new Map<number, Float64Array>();
    referenceForward(ckpt, blocks.slice(0, last + 1), ids, {
      logits: "none",
      onDelta: (i, _delta, input) => {
        if (members.includes(i)) inputs.set(i, input);
      },
    });
    const h = rmsNorm(inputs.get(members[0])!, null, t, d, eps);
    const y = new Float64Array(t * (k - 1) * d);
    members.slice(1).forEach((bi, j) => {
      const target = rmsNorm(inputs.get(bi)!, null, t, d, eps);
      for (let r = 0; r < t; r++) {
        for (let c = 0; c < d; c++) y[(r * (k - 1) + j) * d + c] = target[r * d + c] - h[r * d + c];
      }
    });
    eq.add(t, h, y);
    progress(w + 1);
  });
  return eq;
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

/** Heals every FFN group of the plan in model order; returns the fitted maps and the report. */
export async function healPlan(input: HealInput): Promise<{ heal: FusionHeal; report: HealReport }> {
  const { ckpt, blocks, plan, fits } = input;
  const d = ckpt.config.hidden;
  const variant = healVariant(plan);
  const groups = [...plan.ffn_groups].sort((a, b) => a[0] - b[0]);
  const maps: InputMaps = new Map();
  const reports: HealGroupReport[] = [];
  const tokens = (ws: number[][]) => ws.reduce((n, w) => n + w.length, 0);
  const upTo = (g: number): FusionPlan => ({ ...plan, ffn_groups: groups.slice(0, g) });
  const modelWith = (g: number, extra: InputMaps) =>
    applyPlan(blocks, upTo(g + 1), "fused", fits, { maps: new Map([...maps, ...extra]), variant });
  for (const [g, layers] of groups.entries()) {
    const t0 = performance.now();
    // The model with the earlier groups fused and healed, this group's members still sequential.
    const before = applyPlan(blocks, upTo(g), "fused", fits, { maps, variant });
    const members = layers.map((l) =>
      before.findIndex((b) => b.kind === "ffn" && (b as FfnBlock).layers.length === 1 && b.layers[0] === l)
    );
    const total = input.calibration.length + input.heldout.length;
    const progress = (offset: number) => (done: number) =>
      input.onProgress?.(`heal ffn[${layers[0]}-${layers.at(-1)}]: activations`, offset + done, total);
    const cal = memberInputStats(ckpt, before, members, input.calibration, progress(0));
    const held = memberInputStats(ckpt, before, members, input.heldout, progress(input.calibration.length));
    const zero = new Float64Array((layers.length - 1) * d * d);
    const unhealed = await input.lossOf(modelWith(g, new Map()));
    const tried: { ridge: number; loss: number; c: Float64Array }[] = [];
    for (const [i, ridge] of HEAL_RIDGES.entries()) {
      input.onProgress?.(`heal ffn[${layers[0]}-${layers.at(-1)}]: ridge`, i, HEAL_RIDGES.length);
      const c = cal.solve(ridge);
      tried.push({ ridge, c, loss: await input.lossOf(modelWith(g, inputMaps(layers, c, d))) });
    }
    const best = tried.reduce((a, b) => (b.loss < a.loss ? b : a));
    const healed = best.loss < unhealed;
    if (healed) { for (const [l, m] of inputMaps(layers, best.c, d)) maps.set(l, m); }
    const perToken = (eq: NormalEquations, c: Float64Array) => eq.residual(c) / eq.rows;
    const chosen = healed ? best.c : zero;
    reports.push({
      layers,
      objective: "member_input",
      healed,
      ridge: healed ? best.ridge : null,
      residual: {
        calibration: { before: perToken(cal, zero), after: perToken(cal, chosen) },
        heldout: { before: perToken(held, zero), after: perToken(held, chosen) },
      },
      heldout_loss: {
        unhealed,
        healed: healed ? best.loss : unhealed,
        tried: tried.map(({ ridge, loss }) => ({ ridge, loss })),
      },
      ms: performance.now() - t0,
      ...(healed ? {} : { note: "no ridge lowered the held-out loss: the group is served unhealed" }),
    });
  }
  return {
    heal: { maps, variant },
    report: {
      plan: planId(plan),
      calibration_tokens: tokens(input.calibration),
      heldout_tokens: tokens(input.heldout),
      groups: reports,
    },
  };
}
