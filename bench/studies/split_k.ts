/**
 * Decode steps whose float linears are split along their inner dimension (src/onnx/split_k.ts)
 * against unsplit ones, alternated in one process on WebGPU: one instance of the model per variant
 * (`off`, or the workgroup target the split aims at); per round each profiles --steps captured steps
 * at each batch size after a warm-up (src/bench/step_profile.ts), the order rotated every round.
 * Reports each step's GPU ms (timestamp queries, where the adapter has them) and host ms, median
 * [min-max] of the rounds' medians, and each variant's GPU ms against `off`'s.
 *
 *   scripts/deno run -A bench/studies/split_k.ts [--model DIR] [--dtype auto] [--variants off,1024,4096]
 *     [--batch 1,32] [--steps 16] [--rounds 3] [--json]
 */
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { fail, positive, scriptFlags } from "../../scripts/args.ts";
import { profileSteps } from "../../src/bench/step_profile.ts";
import { BENCH_PROMPT } from "../../src/bench/decode_bench.ts";
import { UNFUSED } from "../../src/fusion/plan.ts";
import { type Spread, spread } from "../../src/numeric.ts";
import { buildInstance, loadAssets, type ModelInstance } from "../../src/instance/build.ts";
import { DEFAULT_SPLIT_K, type SplitK } from "../../src/onnx/split_k.ts";
import { resolveDevice, resolveGraphOptions } from "../../src/ort/ort.ts";

const root = fileURLToPath(new URL("../..", import.meta.url));
const values = scriptFlags({
  model: { type: "string", default: join(root, "models", "tiny-nas") },
  dtype: { type: "string", default: "auto" },
  variants: { type: "string", default: "off,1024,4096" },
  batch: { type: "string", default: "1,32" },
  steps: { type: "string", default: "16" },
  rounds: { type: "string", default: "3" },
  json: { type: "boolean", default: false },
});
const steps = positive("steps", values.steps!);
const rounds = positive("rounds", values.rounds!);
const sizes = values.batch!.split(",").map((b) => positive("batch", b));
if (!["auto", "fp32", "fp16"].includes(values.dtype!)) {
  fail(`--dtype: auto, fp32 or fp16, got ${values.dtype}`);
}
const variants: { name: string; split: SplitK | false }[] = values.variants!.split(",").map((v) =>
  v === "off"
    ? { name: v, split: false }
    : { name: v, split: { ...DEFAULT_SPLIT_K, workgroups: positive("variants", v) } }
);
await resolveDevice("webgpu").catch((e) => fail(`split decode steps are WebGPU's: ${e.message}`));

const assets = await loadAssets(values.model!).catch((e) => fail(`--model ${values.model}: ${e.message}`));
const graph = await resolveGraphOptions(values.dtype as "auto", "none", "webgpu");
const prompt = assets.tokenizer.encode(BENCH_PROMPT);
const instances: ModelInstance[] = [];
for (const v of variants) {
  instances.push(
    await buildInstance(assets, UNFUSED, "webgpu", graph, undefined, undefined, {
      splitK: v.split,
      slots: Math.max(...sizes),
    }),
  );
}

const samples = new Map<string, { gpu: number[]; host: number[] }>();
const key = (v: number, b: number) => `${v} ${b}`;
for (let r = 0; r < rounds; r++) {
  for (let i = 0; i < variants.length; i++) {
    const v = (i + r) % variants.length;
    for (const b of sizes) {
      const p = await profileSteps(instances[v], prompt, b, steps);
      const s = samples.get(key(v, b)) ?? { gpu: [], host: [] };
      if (p.gpu_ms) s.gpu.push(p.gpu_ms.median);
      s.host.push(p.host_ms.median);
      samples.set(key(v, b), s);
    }
  }
}
for (const inst of instances) await inst.release();

const off = variants.findIndex((w) => !w.split);
const rows = variants.flatMap((v, i) =>
  sizes.map((batch) => {
    const s = samples.get(key(i, batch))!;
    const base = off >= 0 ? samples.get(key(off, batch))! : null;
    const gpu = s.gpu.length ? spread(s.gpu) : null;
    return {
      variant: v.name,
      batch,
      nodes: instances[i].nodeCount,
      gpu_ms: gpu,
      host_ms: spread(s.host),
      gpu_vs_off: gpu && base?.gpu.length ? spread(base.gpu).median / gpu.median : null,
    };
  })
);
const report = {
  date: new Date().toISOString(),
  model: values.model,
  dtype: graph.dtype,
  steps,
  rounds,
  rows,
};
const sp = (s: Spread | null) => s ? `${s.median.toFixed(2)} [${s.min.toFixed(2)}-${s.max.toFixed(2)}]` : "-";
if (values.json) console.log(JSON.stringify(report, null, 2));
else {
  console.log(
    `split decode steps, ${values.model} ${graph.dtype}, ${steps} steps a round, ${rounds} rounds; median [min-max] of the rounds' medians`,
  );
  console.log("variant  batch  nodes  GPU ms a step           host ms a step         off/variant GPU");
  for (const r of rows) {
    console.log([
      r.variant.padEnd(8),
      String(r.batch).padStart(5),
      String(r.nodes).padStart(6),
      sp(r.gpu_ms).padEnd(22),
      sp(r.host_ms).padEnd(22),
      r.gpu_vs_off ? `${r.gpu_vs_off.toFixed(2)}x` : "-",
    ].join("  "));
  }
}
