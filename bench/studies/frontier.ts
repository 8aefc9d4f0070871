/**
 * Checks the greedy frontier against exhaustive search: runs `analyze --remove-steps N` (the greedy
 * search the service ships), then measures every contiguous FFN plan of the checkpoint's first
 * attention-free run with the same scorer on the same held-out tokens, and compares, for every budget,
 * the frontier's plan with the best plan of that budget found exhaustively. Writes
 * docs/<model>-frontier.json and prints the table in docs/fusion.md.
 *
 *   scripts/deno run -A bench/studies/frontier.ts [--model DIR] [--steps 6] [--max-width 7]
 */
import { join } from "node:path";
import { scriptFlags } from "../../scripts/args.ts";
import { fileURLToPath } from "node:url";
import {
  contiguousPlans,
  type FrontierPoint,
  type FrontierResult,
  stepsRemoved,
} from "../../src/fusion/frontier.ts";
import { fusableRuns, planId, UNFUSED } from "../../src/fusion/plan.ts";
import { loadCheckpoint, modelName } from "../../src/model/checkpoint.ts";
import { TextTokenizer } from "../../src/model/tokenizer.ts";
import { planScorer } from "../../src/instance/plan_scorer.ts";

const root = fileURLToPath(new URL("../..", import.meta.url));
const values = scriptFlags({
  model: { type: "string", default: join(root, "models", "tiny-nas") },
  steps: { type: "string", default: "6" },
  "max-width": { type: "string", default: "7" },
  out: { type: "string", default: join(root, "docs") },
});
const text = join(root, "data", "eval.py.txt");
const name = modelName(values.model!);
const calibration = { skip: 0, max: 256 };

const out = await new Deno.Command(Deno.execPath(), {
  args: [
    "run",
    "-A",
    join(root, "main.ts"),
    "analyze",
    "--model",
    values.model!,
    "--text",
    text,
    "--max-tokens",
    String(calibration.max),
    "--remove-steps",
    values.steps!,
    "--max-width",
    values["max-width"]!,
  ],
  stdout: "piped",
  stderr: "inherit",
}).output();
if (!out.success) throw new Error("analyze failed");
const frontier: FrontierResult = JSON.parse(new TextDecoder().decode(out.stdout)).frontier;

const ckpt = await loadCheckpoint(values.model!);
const run = fusableRuns(ckpt.config)[0];
if (!run) throw new Error(`${name} has no attention-free run to search exhaustively`);
const scorer = await planScorer(ckpt, await TextTokenizer.load(values.model!), text, calibration);
const exhaustive: FrontierPoint[] = [];
for (const groups of contiguousPlans(run)) {
  const plan = { ...UNFUSED, ffn_groups: groups };
  if (!groups.length) continue;
  const s = await scorer.score(plan);
  exhaustive.push({ steps: stepsRemoved(plan), id: planId(plan), plan, ...s });
  console.error(
    `exhaustive: ${exhaustive.length}/${2 ** (run.length - 1) - 1} ${planId(plan)} ${s.loss.toFixed(4)}`,
  );
}
// The same scorer and tokens: a plan both searches measured must score the same.
for (const p of exhaustive) {
  const again = frontier.plans.find((q) => q.id === p.id);
  if (again && Math.abs(again.loss - p.loss) > 1e-9) throw new Error(`${p.id} scored differently`);
}
const comparison = frontier.frontier.filter((p) => p.steps < run.length).map((p) => {
  const best = exhaustive.filter((e) => e.steps === p.steps).reduce((a, b) => (b.loss < a.loss ? b : a));
  return {
    steps: p.steps,
    frontier: { id: p.id, loss: p.loss },
    exhaustive: { id: best.id, loss: best.loss },
    gap_percent: ((p.loss - best.loss) / best.loss) * 100,
  };
});
await Deno.writeTextFile(
  join(values.out!, `${name}-frontier.json`),
  JSON.stringify({ run, frontier, exhaustive, comparison }, null, 1),
);
console.log(`| steps | frontier plan | loss | best contiguous FFN plan | loss | gap |`);
console.log(`| --- | --- | --- | --- | --- | --- |`);
for (const c of comparison) {
  console.log(
    `| ${c.steps} | \`${c.frontier.id}\` | ${c.frontier.loss.toFixed(4)} | \`${c.exhaustive.id}\` | ${
      c.exhaustive.loss.toFixed(4)
    } | ${c.gap_percent >= 0 ? "+" : ""}${c.gap_percent.toFixed(2)}% |`,
  );
}
console.log(
  `\n${frontier.plans.length} plans measured by the frontier, ${exhaustive.length} exhaustively, on ${frontier.held_out_tokens} held-out tokens`,
);
