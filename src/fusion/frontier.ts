import type { ModelConfig } from "../model/config.ts";
import type { DependencyAnalysis } from "./analyze.ts";
import type { QualityReport } from "./evaluate.ts";
import {
  blockGroups,
  fusableRuns,
  type FusionPlan,
  linearAttention,
  planId,
  removedAttention,
} from "./plan.ts";

/** How a plan scores: held-out loss and perplexity, KL and top-1 agreement against the unfused model. */
export type PlanScore = Required<QualityReport>;

export interface AttentionTrial {
  layer: number;
  mode: "remove" | "linear";
  loss: number;
  kl: number;
}

export interface FrontierPoint {
  /** Sequential steps the plan removes (see stepsRemoved). */
  steps: number;
  id: string;
  plan: FusionPlan;
  loss: number;
  ppl: number;
  kl: number;
  top1_agreement: number;
}

export interface FrontierReport {
  unfused: { loss: number; ppl: number };
  /** The first round: every attention sublayer alone, removed and linear-replaced. */
  attention: AttentionTrial[];
  /** The best plan found for each budget, 1 step up. */
  frontier: FrontierPoint[];
  /** Every plan measured, in the order measured. */
  plans: FrontierPoint[];
}

/** A frontier search's report with the plan its budget allows. */
export interface FrontierResult extends FrontierReport {
  /** The plan the budget allows (most steps within the perplexity bound), if any. */
  budget_plan: FusionPlan | null;
  held_out_tokens: number;
}

/**
 * Sequential steps a plan removes: each removed or linear attention, each FFN merged into a group
 * and each block merged into a block group counts one.
 */
export function stepsRemoved(plan: FusionPlan): number {
  const merged = (groups: number[][]) => groups.reduce((n, g) => n + g.length - 1, 0);
  return removedAttention(plan).length + linearAttention(plan).length + merged(plan.ffn_groups) +
    merged(blockGroups(plan));
}

type Change = { layer: number; mode: "remove" | "linear" };

function planOf(changes: Change[], ffnGroups: number[][] = []): FusionPlan {
  const of = (mode: Change["mode"]) =>
    changes.filter((c) => c.mode === mode).map((c) => c.layer).sort((a, b) => a - b);
  return {
    version: 2,
    attention: { remove: of("remove"), linear: of("linear") },
    ffn_groups: ffnGroups,
    block_groups: [],
  };
}

/**
 * Runs of consecutive SwiGLU layers whose attention is gone (none in the checkpoint, or removed or
 * linear in the plan) after their first layer: FFN groups the attention changes make possible, each
 * cut to `maxWidth`.
 */
export function runsAfter(config: ModelConfig, changed: Set<number>, maxWidth: number): number[][] {
  return fusableRuns(config, changed).flatMap((run) => {
    const groups: number[][] = [];
    for (let i = 0; i + 1 < run.length; i += maxWidth) {
      const g = run.slice(i, i + maxWidth);
      if (g.length >= 2) groups.push(g);
    }
    return groups;
  });
}

/**
 * The speed/quality frontier by measurement, as the paper's Puzzle step makes it scaled to one
 * machine: every attention sublayer is measured removed and linear-replaced; the cheapest change is
 * kept, the rest measured again, and so on (greedy) up to `maxSteps` changes. After each round the
 * FFN runs its attention changes opened are fused and measured too. Each budget keeps its best plan.
 */
export async function searchFrontier(
  config: ModelConfig,
  opts: { maxSteps: number; maxWidth: number; blockGroups?: number[][] },
  score: (plan: FusionPlan) => Promise<PlanScore>,
  unfused: { loss: number; ppl: number },
  onProgress?: (done: number, total: number) => void,
): Promise<FrontierReport> {
  const candidates = config.layers.flatMap((l, i) => (l.attention.kind === "full" ? [i] : []));
  const best = new Map<number, FrontierPoint>();
  const plans: FrontierPoint[] = [];
  const rounds = Math.min(opts.maxSteps, candidates.length);
  const total = Array.from({ length: rounds }, (_, k) => 2 * (candidates.length - k)).reduce(
    (a, b) => a + b,
    0,
  );
  const measure = async (plan: FusionPlan): Promise<PlanScore> => {
    const s = await score(plan);
    const steps = stepsRemoved(plan);
    const point: FrontierPoint = { steps, id: planId(plan), plan, ...s };
    plans.push(point);
    onProgress?.(Math.min(plans.length, total), total);
    if (steps <= opts.maxSteps && (!best.has(steps) || best.get(steps)!.loss > s.loss)) {
      best.set(steps, point);
    }
    return s;
  };
  const attention: AttentionTrial[] = [];
  const changes: Change[] = [];
  for (let round = 0; round < rounds; round++) {
    let pick: { change: Change; loss: number } | null = null;
    for (const layer of candidates) {
      if (changes.some((c) => c.layer === layer)) continue;
      for (const mode of ["remove", "linear"] as const) {
        const s = await measure(planOf([...changes, { layer, mode }]));
        if (round === 0) attention.push({ layer, mode, loss: s.loss, kl: s.kl });
        if (!pick || s.loss < pick.loss) pick = { change: { layer, mode }, loss: s.loss };
      }
    }
    if (!pick) break;
    changes.push(pick.change);
    const runs = runsAfter(config, new Set(changes.map((c) => c.layer)), opts.maxWidth);
    if (runs.length && stepsRemoved(planOf(changes, runs)) <= opts.maxSteps) {
      await measure(planOf(changes, runs));
    }
  }
  // Windows of consecutive attention changes with their FFNs fused (the paper's setting: attention
  // removed first, which opens an FFN run), ranked by the first round's cost of each layer, the best
  // two of each width measured.
  const cheapest = new Map<number, { mode: Change["mode"]; loss: number }>();
  for (const t of attention) {
    if (!cheapest.has(t.layer) || cheapest.get(t.layer)!.loss > t.loss) cheapest.set(t.layer, t);
  }
  for (let width = 2; 2 * width <= opts.maxSteps && width < opts.maxWidth; width++) {
    const windows: { changes: Change[]; cost: number }[] = [];
    for (const start of candidates) {
      const layers = Array.from({ length: width }, (_, i) => start + i);
      if (start === 0 || config.layers[start - 1].ffn.kind !== "swiglu") continue;
      if (!layers.every((l) => cheapest.has(l) && config.layers[l].ffn.kind === "swiglu")) continue;
      const windowChanges = layers.map((layer) => ({ layer, mode: cheapest.get(layer)!.mode }));
      windows.push({ changes: windowChanges, cost: layers.reduce((s, l) => s + cheapest.get(l)!.loss, 0) });
    }
    windows.sort((a, b) => a.cost - b.cost);
    for (const w of windows.slice(0, 2)) {
      await measure(planOf(w.changes, [[w.changes[0].layer - 1, ...w.changes.map((c) => c.layer)]]));
    }
  }
  // Whole blocks in parallel, from the dependency matrix's candidates.
  for (const group of opts.blockGroups ?? []) {
    if (group.length - 1 <= opts.maxSteps) {
      await measure({
        version: 2,
        attention: { remove: [], linear: [] },
        ffn_groups: [],
        block_groups: [group],
      });
    }
  }
  return {
    unfused,
    attention,
    frontier: [...best.values()].sort((a, b) => a.steps - b.steps),
    plans,
  };
}

/**
 * Block-parallel candidates from the dependency matrix: windows of 2 to `maxWidth` consecutive layers,
 * the dependency of layer b on layer a being the largest M[i][j] from a's blocks (attention, FFN) to
 * b's; windows ranked by the largest, then the summed, pairwise dependency inside them (the paper's
 * criterion), the best two of each width.
 */
export function blockCandidates(analysis: DependencyAnalysis, maxWidth: number): number[][] {
  const byLayer = new Map<number, number[]>();
  for (const b of analysis.blocks) byLayer.set(b.layer, [...(byLayer.get(b.layer) ?? []), b.index]);
  const dep = (a: number, b: number) =>
    Math.max(...byLayer.get(a)!.flatMap((i) => byLayer.get(b)!.map((j) => analysis.matrix[i][j])));
  const layers = [...byLayer.keys()].sort((a, b) => a - b);
  const out: number[][] = [];
  for (let width = 2; width <= maxWidth; width++) {
    const ranked = layers.slice(0, layers.length - width + 1).map((start) => {
      const w = Array.from({ length: width }, (_, i) => start + i);
      const pairs = w.flatMap((a, i) => w.slice(i + 1).map((b) => dep(a, b)));
      return { w, max: Math.max(...pairs), sum: pairs.reduce((s, v) => s + v, 0) };
    }).filter((c) => c.w.every((l) => byLayer.has(l)));
    ranked.sort((a, b) => a.max - b.max || a.sum - b.sum);
    out.push(...ranked.slice(0, 2).map((c) => c.w));
  }
  return out;
}

/**
 * The plan a budget allows: the most steps removed whose perplexity stays within `maxLossIncrease`
 * percent of the unfused model's (or, without that bound, the best plan of `steps`).
 */
export function planForBudget(
  report: FrontierReport,
  budget: { steps?: number; maxLossIncrease?: number },
): FrontierPoint | null {
  const allowed = report.frontier.filter((p) =>
    (budget.steps === undefined || p.steps <= budget.steps) &&
    (budget.maxLossIncrease === undefined || p.ppl <= report.unfused.ppl * (1 + budget.maxLossIncrease / 100))
  );
  return allowed.length ? allowed.reduce((a, b) => (b.steps > a.steps ? b : a)) : null;
}
