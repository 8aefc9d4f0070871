import assert from "node:assert/strict";
import { join } from "node:path";
import {
  blockCandidates,
  contiguousPlans,
  ffnMerges,
  ffnShifts,
  type FrontierReport,
  planForBudget,
  type PlanScore,
  runsAfter,
  searchFrontier,
  stepsRemoved,
} from "../src/fusion/frontier.ts";
import {
  checkPlan,
  type FusionPlan,
  linearAttention,
  planId,
  removedAttention,
  UNFUSED,
} from "../src/fusion/plan.ts";
import { loadConfig } from "../src/model/checkpoint.ts";
import { EVAL_TEXT, ROOT, TINY_LLAMA, TINY_NAS } from "./helpers.ts";

Deno.test("frontier: steps removed, runs opened by attention changes, the plan a budget allows", async () => {
  const cfg = await loadConfig(TINY_LLAMA);
  const plan: FusionPlan = {
    version: 2,
    attention: { remove: [4], linear: [5] },
    ffn_groups: [[3, 4, 5]],
    block_groups: [[6, 7]],
  };
  assert.equal(stepsRemoved(plan), 2 + 2 + 1);
  assert.deepEqual(runsAfter(cfg, new Set([4, 5]), 4), [[3, 4, 5]]);
  assert.deepEqual(runsAfter(cfg, new Set([1, 2, 3, 4, 5, 6]), 4), [[0, 1, 2, 3], [4, 5, 6]]);
  assert.deepEqual(runsAfter(cfg, new Set(), 4), [], "a plain Llama has nothing to fuse");
  const point = (steps: number, ppl: number) => ({
    steps,
    ppl,
    id: `p${steps}`,
    plan,
    loss: Math.log(ppl),
    kl: 0,
    top1_agreement: 1,
  });
  const report: FrontierReport = {
    unfused: { loss: Math.log(10), ppl: 10 },
    attention: [],
    frontier: [point(1, 10.1), point(2, 10.4), point(3, 11.5)],
    plans: [],
  };
  assert.equal(planForBudget(report, { maxLossIncrease: 5 })!.steps, 2);
  assert.equal(planForBudget(report, { steps: 1 })!.steps, 1);
  assert.equal(planForBudget(report, { maxLossIncrease: 0.5 }), null);
});

Deno.test("frontier: FFN merges respect attention and width; contiguous plans of a run", async () => {
  const cfg = await loadConfig(TINY_NAS);
  const ids = (plans: number[][][]) => plans.map((g) => planId({ ...UNFUSED, ffn_groups: g }));
  assert.deepEqual(ids(ffnMerges(cfg, new Set(), [], 4)), [
    "ffn[2-3]",
    "ffn[3-4]",
    "ffn[4-5]",
    "ffn[5-6]",
    "ffn[6-7]",
    "ffn[7-8]",
  ]);
  assert.deepEqual(ids(ffnMerges(cfg, new Set(), [[3, 4, 5, 6]], 4)), ["ffn[3-6,7-8]"]);
  assert.deepEqual(
    ids(ffnMerges(cfg, new Set([9]), [[3, 4, 5, 6]], 6)),
    ["ffn[2-6]", "ffn[3-7]", "ffn[3-6,7-8]", "ffn[3-6,8-9]"],
    "removing attention 9 lets FFN 9 join FFN 8",
  );
  assert.deepEqual(
    ids(ffnShifts(cfg, new Set(), [[2, 3], [4, 5, 6, 7, 8]], 6)),
    ["ffn[3-8]", "ffn[2-4,5-8]"],
    "a boundary moved either way keeps the steps; widths bounded",
  );
  assert.deepEqual(ids(ffnShifts(cfg, new Set(), [[2, 3], [4, 5, 6, 7, 8]], 4)), ["ffn[2-4,5-8]"]);
  assert.deepEqual(ids(ffnShifts(cfg, new Set(), [[7, 8]], 4)), ["ffn[6-7]"]);
  const all = contiguousPlans([2, 3, 4, 5, 6, 7, 8]);
  assert.equal(all.length, 64);
  assert.equal(new Set(ids(all)).size, 64, "every plan once");
  assert.ok(all.some((g) => g.length === 0) && all.some((g) => g.length === 1 && g[0].length === 7));
});

Deno.test("frontier search: each plan scored once, one step a round, matches exhaustive search on a separable cost", async () => {
  const cfg = await loadConfig(TINY_NAS);
  // A stand-in for held-out loss: every attention change has a cost, and every pair of FFNs computed
  // in parallel costs by how far apart they are (near pairs are cheap, as the dependency matrix says).
  const attnCost = new Map([[0, 0.3], [1, 0.9], [2, 0.8], [9, 0.12], [10, 0.2], [11, 0.5]]);
  const loss = (plan: FusionPlan) =>
    2 +
    removedAttention(plan).reduce((s, l) => s + attnCost.get(l)!, 0) +
    linearAttention(plan).reduce((s, l) => s + attnCost.get(l)! * 0.8, 0) +
    plan.ffn_groups.flatMap((g) => g.flatMap((a, i) => g.slice(i + 1).map((b) => 0.01 * (b - a) ** 2)))
      .reduce((s, v) => s + v, 0);
  const calls = new Map<string, number>();
  const score = (plan: FusionPlan): Promise<PlanScore> => {
    calls.set(planId(plan), (calls.get(planId(plan)) ?? 0) + 1);
    const l = loss(plan);
    return Promise.resolve({ loss: l, ppl: Math.exp(l), kl: l - 2, top1_agreement: 1, tokens: 1 });
  };
  const progress: [number, number][] = [];
  const report = await searchFrontier(
    cfg,
    { maxSteps: 6, maxWidth: 7 },
    score,
    { loss: 2, ppl: Math.exp(2) },
    (done, total) => progress.push([done, total]),
  );
  assert.ok([...calls.values()].every((n) => n === 1), "no plan measured twice");
  assert.equal(calls.size, report.plans.length);
  assert.deepEqual(report.frontier.map((p) => p.steps), [1, 2, 3, 4, 5, 6]);
  assert.equal(report.attention.length, 12, "six attention sublayers, removed and linear");
  assert.ok(progress.every(([d, t], i) => d <= t && (i === 0 || d >= progress[i - 1][0])));
  assert.deepEqual(progress.at(-1), [report.plans.length, report.plans.length]);
  const exhaustive = contiguousPlans([2, 3, 4, 5, 6, 7, 8]).map((g) => ({ ...UNFUSED, ffn_groups: g }));
  for (const p of report.frontier) {
    const best = Math.min(...exhaustive.filter((e) => stepsRemoved(e) === p.steps).map(loss));
    assert.ok(p.loss <= best * 1.01, `${p.steps} steps: ${p.id} ${p.loss} vs ${best}`);
    assert.equal(p.loss, loss(p.plan));
  }
});

Deno.test("frontier: block-parallel candidates are the windows of lowest pairwise dependency", () => {
  // Four layers, blocks attn/ffn each; layers 1-2 barely depend on each other, 2-3 strongly.
  const n = 8;
  const matrix = Array.from({ length: n }, () => new Array<number>(n).fill(0.5));
  const set = (a: number, b: number, v: number) => {
    for (const i of [2 * a, 2 * a + 1]) for (const j of [2 * b, 2 * b + 1]) matrix[i][j] = v;
  };
  set(1, 2, 0.05);
  set(0, 1, 0.3);
  set(2, 3, 0.9);
  const blocks = Array.from({ length: n }, (_, index) => ({
    index,
    kind: index % 2 ? "ffn" as const : "attention" as const,
    layer: Math.floor(index / 2),
    label: "",
  }));
  const candidates = blockCandidates({ blocks, matrix, ratios: [], tokens: 1 }, 3);
  assert.deepEqual(candidates.slice(0, 2), [[1, 2], [0, 1]]);
  assert.deepEqual(candidates.slice(2), [[0, 1, 2], [1, 2, 3]]);
});

Deno.test({
  name:
    "analyze --remove-steps on tiny-llama: a measured frontier; attention removed from consecutive layers, then their FFNs fused",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const out = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        join(ROOT, "main.ts"),
        "analyze",
        "--model",
        TINY_LLAMA,
        "--text",
        EVAL_TEXT,
        "--max-tokens",
        "64",
        "--window",
        "64",
        "--remove-steps",
        "4",
        "--max-loss-increase",
        "50",
      ],
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
    const report = JSON.parse(new TextDecoder().decode(out.stdout));
    const f = report.frontier;
    const cfg = await loadConfig(TINY_LLAMA);
    assert.equal(f.held_out_tokens, 254, "256 held-out tokens in two windows of 128");
    assert.equal(f.attention.length, 2 * 8, "every attention sublayer, removed and linear");
    assert.deepEqual(f.frontier.map((p: { steps: number }) => p.steps), [1, 2, 3, 4]);
    for (const p of f.frontier) {
      checkPlan(p.plan, cfg);
      assert.equal(p.id, planId(p.plan));
      assert.ok(Number.isFinite(p.loss) && p.kl >= 0 && p.top1_agreement > 0 && p.top1_agreement <= 1);
      assert.ok(p.loss > f.unfused.loss - 0.05, "no plan is much better than the model itself");
    }
    assert.ok(f.plans.length >= 4 * 8, `${f.plans.length} plans measured`);
    const fusedAcross = f.plans.find((p: { plan: FusionPlan }) => {
      const changed = [
        ...(p.plan.version === 2 ? [...p.plan.attention.remove, ...p.plan.attention.linear] : []),
      ];
      return p.plan.ffn_groups.some((g) => g.slice(1).filter((l) => changed.includes(l)).length >= 2);
    });
    assert.ok(fusedAcross, "a plan removes attention from two consecutive layers and fuses their FFNs");
    const blockPlans = f.plans.filter((p: { plan: FusionPlan }) =>
      p.plan.version === 2 && p.plan.block_groups.length
    );
    assert.ok(blockPlans.length >= 4, "block-parallel candidates of widths 2 to 4 were measured");
    assert.ok(
      blockPlans.every((p: { steps: number; plan: { block_groups: number[][] } }) =>
        p.steps === p.plan.block_groups[0].length - 1
      ),
    );
    if (f.budget_plan) {
      const chosen = f.frontier.find((p: { id: string }) => p.id === planId(f.budget_plan));
      assert.ok(chosen.ppl <= f.unfused.ppl * 1.5);
    }
  },
});
