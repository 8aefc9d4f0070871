/**
 * Reproduces the fusion quality table in docs/fusion.md: analysis on the first calibration tokens of
 * data/eval.py.txt, then loss/perplexity/KL/top-1 agreement on the held-out tokens after them, for
 * the unfused model, the suggested plan, a set of hand-written plans and, from the measured frontier
 * (docs/<model>-frontier.json, written by bench/studies/frontier.ts), the best block-parallel plan and the
 * best plans that remove attention or make it linear, alone and with FFNs fused; then every plan that
 * has FFN or block groups again, healed (its "gap closed" against the unhealed plan).
 *
 *   scripts/deno run -A scripts/quality.ts [--model DIR] [--calibration 512] [--eval 8192]
 */
import { join } from "node:path";
import { scriptFlags } from "./args.ts";
import { fileURLToPath } from "node:url";
import type { FrontierPoint } from "../src/fusion/frontier.ts";
import {
  blockGroups,
  type FusionPlan,
  healable,
  linearAttention,
  removedAttention,
} from "../src/fusion/plan.ts";
import { stepsRemoved } from "../src/fusion/frontier.ts";
import { modelName } from "../src/model/checkpoint.ts";

const root = fileURLToPath(new URL("..", import.meta.url));
const values = scriptFlags({
  model: { type: "string", default: join(root, "models", "tiny-nas") },
  calibration: { type: "string", default: "512" },
  eval: { type: "string", default: "8192" },
  out: { type: "string", default: join(root, "docs") },
});
const text = join(root, "data", "eval.py.txt");
/** Where healing's calibration starts in the text: past the evaluation slice and its unrepresentative tail. */
const HEAL_SKIP = 65536;
const name = modelName(values.model!);

async function cli(args: string[]): Promise<Record<string, unknown>> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", join(root, "main.ts"), ...args, "--model", values.model!],
    stdout: "piped",
    stderr: "inherit",
  }).output();
  if (!out.success) throw new Error(`${args[0]} failed`);
  return JSON.parse(new TextDecoder().decode(out.stdout));
}

await Deno.mkdir(values.out!, { recursive: true });
const svg = join(values.out!, `${name}-dependency.svg`);
const analysis = await cli(["analyze", "--text", text, "--max-tokens", values.calibration!, "--svg", svg]);
await Deno.writeTextFile(join(values.out!, `${name}-analysis.json`), JSON.stringify(analysis, null, 1));
const suggested = analysis.suggested_plan as { ffn_groups: number[][] };
const plans: FusionPlan[] = [
  suggested.ffn_groups,
  [[3, 4, 5], [6, 7, 8]],
  [[3, 4], [5, 6], [7, 8]],
  [[2, 3, 4, 5]],
  [[3, 4, 5, 6, 7, 8]],
  [[2, 3, 4, 5, 6, 7, 8]],
].map((ffn_groups) => ({ version: 1, ffn_groups }));
const frontierFile = join(values.out!, `${name}-frontier.json`);
const measured: FrontierPoint[] = JSON.parse(
  await Deno.readTextFile(frontierFile).catch(() => {
    throw new Error(`${frontierFile} is missing: run bench/studies/frontier.ts first`);
  }),
).frontier.plans;
const bestOf = (keep: (p: FusionPlan) => boolean) =>
  measured.filter((p) => keep(p.plan)).reduce<FrontierPoint | null>(
    (a, b) => (!a || b.loss < a.loss ? b : a),
    null,
  );
const changed = (p: FusionPlan) => removedAttention(p).length + linearAttention(p).length > 0;
for (
  const pick of [
    bestOf((p) => blockGroups(p).length > 0),
    bestOf((p) => removedAttention(p).length > 0 && !linearAttention(p).length && !p.ffn_groups.length),
    bestOf((p) => linearAttention(p).length > 0 && !removedAttention(p).length && !p.ffn_groups.length),
    bestOf((p) => changed(p) && p.ffn_groups.length > 0 && stepsRemoved(p) >= 3),
  ]
) if (pick) plans.push(pick.plan);
const evalArgs = [
  "--text",
  text,
  "--max-tokens",
  values.eval!,
  "--skip-tokens",
  values.calibration!,
];
const onWasm = [...evalArgs, "--device", "wasm"];
const rows = [await cli(["eval", ...onWasm])];
const dir = await Deno.makeTempDir();
const planFiles: string[] = [];
const stepsOf = new Map<unknown, number>([[rows[0], 0]]);
for (const [i, plan] of plans.entries()) {
  const file = join(dir, `plan${i}.json`);
  planFiles.push(file);
  await Deno.writeTextFile(file, JSON.stringify(plan));
  const row = { ...(await cli(["eval", ...onWasm, "--plan", file])), suggested: i === 0 };
  stepsOf.set(row, stepsRemoved(plan));
  rows.push(row);
}
// Quantization composes with fusion: each weight format unfused and under the suggested plan, on each
// CPU device, which computes it differently (WASM: integer GEMMs; native: MatMulNBits in int8).
for (const device of ["wasm", "cpu"]) {
  for (const q of ["int8", "int4"]) {
    const args = [...evalArgs, "--device", device, "--quantize", q];
    const unfused = await cli(["eval", ...args]);
    const fused = { ...(await cli(["eval", ...args, "--plan", planFiles[0]])), suggested: true };
    stepsOf.set(unfused, 0).set(fused, stepsRemoved(plans[0]));
    rows.push(unfused, fused);
  }
}
// Healed beside unhealed: every plan with FFN or block groups, healed on calibration tokens far from the
// evaluation slice (data/eval.py.txt from token 65536; the tokens between are not representative).
const healed: Record<string, unknown>[] = [];
for (const [i, plan] of plans.entries()) {
  if (!healable(plan)) continue;
  const file = join(dir, `healed${i}.json`);
  await Deno.writeTextFile(file, JSON.stringify({ ...plan, heal: { skip_tokens: HEAL_SKIP } }));
  const row = await cli(["eval", ...onWasm, "--plan", file]);
  const unfused = rows[0].loss as number;
  const fused = rows[i + 1].loss as number;
  healed.push({
    ...row,
    unhealed_loss: fused,
    gap_closed: (fused - (row.loss as number)) / (fused - unfused),
  });
}
await Deno.writeTextFile(join(values.out!, `${name}-quality.json`), JSON.stringify(rows, null, 1));
await Deno.writeTextFile(join(values.out!, `${name}-healed.json`), JSON.stringify(healed, null, 1));
const f = (x: unknown, d = 4) => (typeof x === "number" ? x.toFixed(d) : "");
console.log(`| plan | weights | steps removed | loss | ppl | KL to unfused fp32 | top-1 agreement |`);
console.log(`| --- | --- | --- | --- | --- | --- | --- |`);
for (const r of rows) {
  const label = `\`${r.plan}\`${r.suggested ? " (suggested)" : ""}`;
  console.log(
    `| ${label} | ${r.quantize === "none" ? "fp32" : `${r.quantize} on ${r.device}`} (${
      ((r.weight_bytes as number) / 1e6).toFixed(1)
    } MB) | ${stepsOf.get(r)} | ${f(r.loss)} | ${f(r.ppl, 3)} | ${f(r.kl)} | ${f(r.top1_agreement, 3)} |`,
  );
}
console.log(
  `\n${rows[0].tokens} held-out tokens after ${values.calibration} calibration tokens; heatmap: ${svg}`,
);
console.log(
  `\n| plan | loss unhealed | loss healed | gap closed | ppl | KL to unfused fp32 | top-1 agreement | groups healed |`,
);
console.log(`| --- | --- | --- | --- | --- | --- | --- | --- |`);
for (const r of healed) {
  const groups = (r.heal as { groups: { healed: boolean }[] }).groups;
  console.log(
    `| \`${r.plan}\` | ${f(r.unhealed_loss)} | ${f(r.loss)} | ${
      ((r.gap_closed as number) * 100).toFixed(1)
    }% | ${f(r.ppl, 3)} | ${f(r.kl)} | ${f(r.top1_agreement, 3)} | ${
      groups.filter((g) => g.healed).length
    } of ${groups.length} |`,
  );
}
