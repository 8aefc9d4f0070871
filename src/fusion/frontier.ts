import type { ModelConfig } from "../model/config.ts";
import type { AnalysisReport, DependencyAnalysis } from "./analyze.ts";
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
/** An analysis and, with remove_steps, the speed/quality frontier measured on held-out text. */
export interface AnalysisWithFrontier extends AnalysisReport {
  frontier?: FrontierResult;
}

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
 * Each pair of neighbouring FFNs in a run whose attention is gone, as the groups holding them (a
 * lone FFN is a group of one), with `redraw` giving the group list with those two replaced.
 */
function* neighbours(config: ModelConfig, changed: Set<number>, groups: number[][]) {
  for (const run of fusableRuns(config, changed)) {
    for (let i = 0; i + 1 < run.length; i++) {
      const left = groups.find((g) => g.includes(run[i])) ?? [run[i]];
      const right = groups.find((g) => g.includes(run[i + 1])) ?? [run[i + 1]];
      if (left === right) continue;
      const redraw = (...replacement: number[][]) =>
        [...groups.filter((g) => g !== left && g !== right), ...replacement]
          .filter((g) => g.length >= 2)
          .sort((x, y) => x[0] - y[0]);
      yield { left, right, redraw };
    }
  }
}

/**
 * Every way to grow `groups` by one sequential step: two neighbouring FFNs (or the groups holding
 * them) merged, where the second one's attention is gone and the merged group stays within
 * `maxWidth`. Each result is a group list in layer order.
 */
export function ffnMerges(
  config: ModelConfig,
  changed: Set<number>,
  groups: number[][],
  maxWidth: number,
): number[][][] {
  return [...neighbours(config, changed, groups)]
    .filter(({ left, right }) => left.length + right.length <= maxWidth)
    .map(({ left, right, redraw }) => redraw([...left, ...right]));
}

/**
 * Every way to redraw `groups` at the same number of steps: the last FFN of a group (or a lone FFN)
 * moved into the group after it, or the first FFN of a group moved into the one before it, within
 * one run whose attention is gone and within `maxWidth`. The local search that polishes the greedy's
 * plan of each budget.
 */
export function ffnShifts(
  config: ModelConfig,
  changed: Set<number>,
  groups: number[][],
  maxWidth: number,
): number[][][] {
  return [...neighbours(config, changed, groups)].flatMap(({ left, right, redraw }) => [
    ...(left.length >= 2 && right.length < maxWidth
      ? [redraw(left.slice(0, -1), [left.at(-1)!, ...right])]
      : []),
    ...(right.length >= 2 && left.length < maxWidth ? [redraw([...left, right[0]], right.slice(1))] : []),
  ]);
}

/**
 * Every plan of `run` that splits it into consecutive groups (2^(n-1) of them, the unfused one
 * included): the exhaustive search the greedy frontier is checked against.
 */
export function contiguousPlans(run: number[]): number[][][] {
  const out: number[][][] = [];
  for (let cuts = 0; cuts < 2 ** (run.length - 1); cuts++) {
    const groups: number[][] = [];
    let group = [run[0]];
    for (let i = 1; i < run.length; i++) {
      if (cuts & (1 << (i - 1))) {
        groups.push(group);
        group = [run[i]];
      } else group.push(run[i]);
    }
    groups.push(group);
    out.push(groups.filter((g) => g.length >= 2));
  }
  return out;
}

/**
 * The speed/quality frontier by measurement, as the paper's Puzzle step makes it scaled to one
 * machine. Greedy, one step a round: every attention sublayer still present is measured removed and
 * linear-replaced, and every merge of two neighbouring FFNs whose attention is gone is measured; the
 * cheapest of all of them is kept and the next round starts from it. After each round the FFN runs the
 * kept attention changes opened are also measured fused all at once (a jump of several steps the
 * one-step greedy would not take when each single merge looks worse than another attention change);
 * then windows of consecutive attention changes with their FFNs fused; then block-parallel groups;
 * last, each budget's best FFN grouping is polished by local search (ffnShifts), which is what
 * catches the splits a one-merge-at-a-time greedy cannot reach. A plan is measured once however many
 * paths reach it. Each budget keeps its best plan.
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
  const measured = new Map<string, Promise<FrontierPoint>>();
  // Known only round by round (merges open as attention goes): each round re-estimates the rest
  // from the moves it has, so the total settles as the search goes.
  let total = 0;
  const report = () => onProgress?.(plans.length, Math.max(total, plans.length));
  const measure = (plan: FusionPlan): Promise<FrontierPoint> => {
    const id = planId(plan);
    if (!measured.has(id)) {
      measured.set(
        id,
        score(plan).then((s) => {
          const steps = stepsRemoved(plan);
          const point: FrontierPoint = { steps, id, plan, ...s };
          plans.push(point);
          report();
          if (steps <= opts.maxSteps && (!best.has(steps) || best.get(steps)!.loss > s.loss)) {
            best.set(steps, point);
          }
          return point;
        }),
      );
    }
    return measured.get(id)!;
  };
  const extras = (opts.blockGroups ?? []).length + 2 * Math.max(0, Math.floor(opts.maxSteps / 2) - 1) +
    4 * opts.maxSteps;
  const attention: AttentionTrial[] = [];
  let changes: Change[] = [];
  let groups: number[][] = [];
  for (let round = 0; round < opts.maxSteps; round++) {
    const changed = new Set(changes.map((c) => c.layer));
    const moves: { changes: Change[]; groups: number[][] }[] = [
      ...candidates.filter((l) => !changed.has(l)).flatMap((layer) =>
        (["remove", "linear"] as const).map((mode) => ({ changes: [...changes, { layer, mode }], groups }))
      ),
      ...ffnMerges(config, changed, groups, opts.maxWidth).map((g) => ({ changes, groups: g })),
    ];
    total = plans.length + (opts.maxSteps - round) * (moves.length + 1) + extras;
    report();
    let pick: { move: (typeof moves)[number]; loss: number } | null = null;
    for (const move of moves) {
      const s = await measure(planOf(move.changes, move.groups));
      if (round === 0 && move.changes.length) {
        const c = move.changes[move.changes.length - 1];
        attention.push({ layer: c.layer, mode: c.mode, loss: s.loss, kl: s.kl });
      }
      if (!pick || s.loss < pick.loss) pick = { move, loss: s.loss };
    }
    if (!pick) break;
    ({ changes, groups } = pick.move);
    const runs = runsAfter(config, new Set(changes.map((c) => c.layer)), opts.maxWidth);
    if (changes.length && runs.length && stepsRemoved(planOf(changes, runs)) <= opts.maxSteps) {
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
  // Each budget's best FFN grouping polished by local search: boundaries moved while that helps.
  for (const start of [...best.values()]) {
    if (blockGroups(start.plan).length) continue;
    const changes: Change[] = [
      ...removedAttention(start.plan).map((layer) => ({ layer, mode: "remove" as const })),
      ...linearAttention(start.plan).map((layer) => ({ layer, mode: "linear" as const })),
    ];
    const changed = new Set(changes.map((c) => c.layer));
    let current: FrontierPoint | null = start;
    while (current) {
      let better: FrontierPoint | null = null;
      for (const groups of ffnShifts(config, changed, current.plan.ffn_groups, opts.maxWidth)) {
        const p = await measure(planOf(changes, groups));
        if (p.loss < (better ?? current).loss) better = p;
      }
      current = better;
    }
  }
  total = plans.length;
  report();
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
 * criterion), the best two of each width. A window whose layers after the first have no attention is
 * an FFN group (the greedy's merges measure those), so only windows with attention inside count.
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
    }).filter((c) =>
      c.w.every((l) => byLayer.has(l)) &&
      c.w.slice(1).some((l) => analysis.blocks.some((b) => b.layer === l && b.kind !== "ffn"))
    );
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
