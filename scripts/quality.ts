/**
 * Reproduces the fusion quality table in the README: analysis on the first calibration tokens of
 * data/eval.py.txt, then loss/perplexity/KL/top-1 agreement on the held-out tokens after them, for
 * the unfused model, the suggested plan and a set of hand-written plans.
 *
 *   scripts/deno run -A scripts/quality.ts [--model DIR] [--calibration 512] [--eval 8192]
 */
import { parseArgs } from "node:util";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { modelName } from "../src/model/checkpoint.ts";

const root = fileURLToPath(new URL("..", import.meta.url));
const { values } = parseArgs({
  args: Deno.args,
  options: {
    model: { type: "string", default: join(root, "models", "tiny-nas") },
    calibration: { type: "string", default: "512" },
    eval: { type: "string", default: "8192" },
    out: { type: "string", default: join(root, "docs") },
  },
});
const text = join(root, "data", "eval.py.txt");
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
const plans: number[][][] = [
  suggested.ffn_groups,
  [[3, 4, 5], [6, 7, 8]],
  [[3, 4], [5, 6], [7, 8]],
  [[2, 3, 4, 5]],
  [[3, 4, 5, 6, 7, 8]],
  [[2, 3, 4, 5, 6, 7, 8]],
];
const evalArgs = [
  "--text",
  text,
  "--max-tokens",
  values.eval!,
  "--skip-tokens",
  values.calibration!,
  "--device",
  "wasm",
];
const rows = [await cli(["eval", ...evalArgs])];
const dir = await Deno.makeTempDir();
const planFiles: string[] = [];
for (const [i, groups] of plans.entries()) {
  const file = join(dir, `plan${i}.json`);
  planFiles.push(file);
  await Deno.writeTextFile(file, JSON.stringify({ version: 1, ffn_groups: groups }));
  rows.push({ ...(await cli(["eval", ...evalArgs, "--plan", file])), suggested: i === 0 });
}
// Quantization composes with fusion: each weight format unfused and under the suggested plan.
for (const q of ["int8", "int4"]) {
  rows.push(await cli(["eval", ...evalArgs, "--quantize", q]));
  rows.push({
    ...(await cli(["eval", ...evalArgs, "--quantize", q, "--plan", planFiles[0]])),
    suggested: true,
  });
}
await Deno.writeTextFile(join(values.out!, `${name}-quality.json`), JSON.stringify(rows, null, 1));
const f = (x: unknown, d = 4) => (typeof x === "number" ? x.toFixed(d) : "");
console.log(`| plan | weights | FFN blocks | loss | ppl | KL to unfused fp32 | top-1 agreement |`);
console.log(`| --- | --- | --- | --- | --- | --- | --- |`);
for (const r of rows) {
  const groups = r.plan === "unfused" ? [] : String(r.plan).slice(4, -1).split(",");
  const merged = groups.reduce((n, g) => n + Number(g.split("-")[1]) - Number(g.split("-")[0]), 0);
  const label = `\`${r.plan}\`${r.suggested ? " (suggested)" : ""}`;
  console.log(
    `| ${label} | ${r.quantize === "none" ? "fp32" : r.quantize} (${
      ((r.weight_bytes as number) / 1e6).toFixed(1)
    } MB) | ${12 - merged} | ${f(r.loss)} | ${f(r.ppl, 3)} | ${f(r.kl)} | ${f(r.top1_agreement, 3)} |`,
  );
}
console.log(
  `\n${rows[0].tokens} held-out tokens after ${values.calibration} calibration tokens; heatmap: ${svg}`,
);
