/**
 * What a decode step on a host device (native CPU, or WASM) costs with its caches written in place (the
 * step fetches only the positions it wrote: DecoderLayout.newKv) against caches copied out of
 * onnxruntime every step (each present fetched whole into new memory), at each batch size and cached
 * length. Cases are warmed, then alternated in rounds; ms per step and CPU ms per step as median
 * [min-max], and the copied step's time over the in-place one's.
 *
 *   scripts/deno run -A bench/studies/host_kv.ts [--device cpu|wasm] [--model DIR] [--batch 1,16]
 *     [--lengths 32,128,512] [--steps 16] [--rounds 5] [--json]
 */
import { positive, scriptFlags } from "../../scripts/args.ts";
import { batchStepTimes } from "../../src/bench/decode_bench.ts";
import { inRounds } from "../../src/bench/rounds.ts";
import { UNFUSED } from "../../src/fusion/plan.ts";
import { applyPlan } from "../../src/fusion/apply.ts";
import { type Spread, spread } from "../../src/numeric.ts";
import { buildDecoderGraph } from "../../src/onnx/decoder.ts";
import { DEFAULT_MODEL, hostStudy } from "./host_setup.ts";
import { ModelSession } from "../../src/ort/session.ts";

const values = scriptFlags({
  model: { type: "string", default: DEFAULT_MODEL },
  device: { type: "string", default: "cpu" },
  batch: { type: "string", default: "1,16" },
  lengths: { type: "string", default: "32,128,512" },
  steps: { type: "string", default: "16" },
  rounds: { type: "string", default: "5" },
  json: { type: "boolean", default: false },
});
const sizes = values.batch!.split(",").map((s) => positive("batch", s));
const lengths = values.lengths!.split(",").map((s) => positive("lengths", s));
const steps = positive("steps", values.steps!);
const rounds = positive("rounds", values.rounds!);

const longest = Math.max(...lengths);
const { device, assets, ids } = await hostStudy(
  values.device!,
  values.model!,
  longest + 1,
  longest + steps + 1,
  `--lengths up to ${longest} with --steps ${steps} do not fit the text or the context`,
);
const cfg = assets.checkpoint.config;

const blocks = applyPlan(assets.blocks, UNFUSED);
const variants = ["in place", "copied"] as const;
type Variant = (typeof variants)[number];
const sessions = new Map<Variant, ModelSession>();
for (const v of variants) {
  const graph = buildDecoderGraph(assets.checkpoint, blocks, undefined, undefined, {
    newKv: v === "in place",
  });
  sessions.set(v, await ModelSession.create(graph, device, cfg.vocabSize));
}

const cases = variants.flatMap((variant) =>
  sizes.flatMap((batch) => lengths.map((length) => ({ variant, batch, length })))
);
/** One sample: `steps` batched steps, every row continuing a `length`-token prefix. */
const samples = await inRounds(
  cases,
  rounds,
  ({ variant, batch, length }) => batchStepTimes(sessions.get(variant)!, ids, length, batch, steps),
);
for (const s of sessions.values()) await s.release();

interface Row {
  variant: Variant;
  batch: number;
  length: number;
  ms_per_step: Spread;
  cpu_ms_per_step: Spread;
  /** Median ms per step over the in-place case's at the same batch and length. */
  over_in_place: number;
}
const rows: Row[] = cases.map((c, i) => ({
  ...c,
  ms_per_step: spread(samples[i].map((x) => x.ms)),
  cpu_ms_per_step: spread(samples[i].map((x) => x.cpuMs)),
  over_in_place: 0,
}));
for (const r of rows) {
  const base = rows.find((x) => x.variant === "in place" && x.batch === r.batch && x.length === r.length)!;
  r.over_in_place = r.ms_per_step.median / base.ms_per_step.median;
}
if (values.json) {
  console.log(JSON.stringify({ model: values.model, device, steps, rounds, rows }, null, 1));
} else {
  const f = (s: Spread) => `${s.median.toFixed(2)} [${s.min.toFixed(2)}-${s.max.toFixed(2)}]`;
  console.log(
    `${device} decode steps of ${values.model}, ${steps} steps per sample, cases alternated in ${rounds} ` +
      "rounds; median [min-max]",
  );
  console.log("caches    batch  cached  ms per step          CPU ms per step      over in place");
  for (const r of rows) {
    console.log(
      `${r.variant.padEnd(9)} ${String(r.batch).padEnd(6)} ${String(r.length).padEnd(7)} ${
        f(r.ms_per_step).padEnd(20)
      } ${f(r.cpu_ms_per_step).padEnd(20)} ${r.over_in_place.toFixed(2)}x`,
    );
  }
}
