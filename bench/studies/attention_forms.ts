/**
 * What each attention form costs a whole decoder on a host device: onnxruntime's fused
 * GroupQueryAttention (which copies each past into a present, fetched as the next step's cache)
 * against attention from MatMuls over caches in place (src/onnx/matmul_attention.ts), for
 * decode steps of `batch` rows after `length` cached positions and for one prefill run of `chunk`
 * prompt tokens after `length` cached. Cases are warmed, then alternated in rounds; ms and CPU ms as
 * median [min-max], and the fused form's time over the MatMul form's.
 *
 *   scripts/deno run -A bench/studies/attention_forms.ts [--device wasm|cpu] [--model DIR]
 *     [--quantize none|int8|int4] [--batch 1,16] [--lengths 32,256,768] [--chunk 128] [--steps 8]
 *     [--rounds 5] [--json]
 *
 * `--quantize` builds the weights as the device serves them (`serve --quantize`), so that a real-sized
 * model's attention is weighed against the linears it runs beside.
 */
import { fail, positive, scriptFlags } from "../../scripts/args.ts";
import { batchStepTimes, cpuSeconds } from "../../src/bench/decode_bench.ts";
import { inRounds } from "../../src/bench/rounds.ts";
import { UNFUSED } from "../../src/fusion/plan.ts";
import { applyPlan } from "../../src/fusion/apply.ts";
import { type Spread, spread } from "../../src/numeric.ts";
import { type AttentionForm, buildDecoderGraph } from "../../src/onnx/decoder.ts";
import { DEFAULT_MODEL, hostStudy } from "./host_setup.ts";
import { disposeCache, ModelSession } from "../../src/ort/session.ts";
import { resolveGraphOptions } from "../../src/ort/ort.ts";
import { quantizeFlag } from "../../src/cli/flags.ts";

const values = scriptFlags({
  model: { type: "string", default: DEFAULT_MODEL },
  device: { type: "string", default: "wasm" },
  quantize: { type: "string", default: "none" },
  batch: { type: "string", default: "1,16" },
  lengths: { type: "string", default: "32,256,768" },
  chunk: { type: "string", default: "128" },
  steps: { type: "string", default: "8" },
  rounds: { type: "string", default: "5" },
  json: { type: "boolean", default: false },
});
const sizes = values.batch!.split(",").map((s) => positive("batch", s));
// 0 cached: a prompt's first run (prefill only; a decode step needs a cached position).
const lengths = values.lengths!.split(",").map((s) => s === "0" ? 0 : positive("lengths", s));
const chunk = positive("chunk", values.chunk!);
const steps = positive("steps", values.steps!);
const rounds = positive("rounds", values.rounds!);
// The CLI's own schema: the study builds what `serve --quantize` would.
const quantized = quantizeFlag.safeParse(values.quantize);
if (!quantized.success) {
  fail(`--quantize: one of ${quantizeFlag.unwrap().options.join(", ")}, got ${values.quantize}`);
}
const quantize = quantized.data;

const longest = Math.max(...lengths) + Math.max(chunk, steps + 1);
const { device, assets, ids } = await hostStudy(
  values.device!,
  values.model!,
  longest + 1,
  longest,
  `--lengths up to ${Math.max(...lengths)} with --chunk ${chunk} do not fit the text or the context`,
);
const cfg = assets.checkpoint.config;

const blocks = applyPlan(assets.blocks, UNFUSED);
const options = await resolveGraphOptions("fp32", quantize, device);
const forms: AttentionForm[] = ["fused", "matmul"];
const sessions = new Map<AttentionForm, ModelSession>();
for (const form of forms) {
  const graph = buildDecoderGraph(assets.checkpoint, blocks, options, undefined, { attention: form });
  sessions.set(form, await ModelSession.create(graph, device, cfg.vocabSize));
}

/** One prefill run of `chunk` tokens after `length` cached ones (the prefix prefilled untimed). */
async function prefillTime(s: ModelSession, length: number): Promise<{ ms: number; cpuMs: number }> {
  const prefix = length ? (await s.step(ids.slice(0, length), s.emptyCache(), "last")).cache : s.emptyCache();
  const cpu0 = cpuSeconds();
  const t0 = performance.now();
  const r = await s.step(ids.slice(length, length + chunk), prefix, "last");
  const ms = performance.now() - t0;
  const cpuMs = (cpuSeconds() - cpu0) * 1000;
  disposeCache(r.cache);
  return { ms, cpuMs };
}

type Run = { kind: "decode"; batch: number } | { kind: "prefill"; batch: 1 };
const runs: Run[] = [...sizes.map((batch) => ({ kind: "decode" as const, batch })), {
  kind: "prefill",
  batch: 1,
}];
const cases = forms.flatMap((form) =>
  runs.flatMap((run) =>
    lengths.filter((length) => length > 0 || run.kind === "prefill").map((length) => ({
      form,
      ...run,
      length,
    }))
  )
);
const samples = await inRounds(cases, rounds, ({ form, kind, batch, length }) => {
  const s = sessions.get(form)!;
  return kind === "decode" ? batchStepTimes(s, ids, length, batch, steps) : prefillTime(s, length);
});
for (const s of sessions.values()) await s.release();

interface Row {
  form: AttentionForm;
  kind: Run["kind"];
  batch: number;
  length: number;
  ms: Spread;
  cpu_ms: Spread;
  /** The fused form's median ms over this form's, same kind, batch and length. */
  fused_over_this: number;
}
const rows: Row[] = cases.map((c, i) => ({
  form: c.form,
  kind: c.kind,
  batch: c.batch,
  length: c.length,
  ms: spread(samples[i].map((x) => x.ms)),
  cpu_ms: spread(samples[i].map((x) => x.cpuMs)),
  fused_over_this: 0,
}));
for (const r of rows) {
  const fused = rows.find((x) =>
    x.form === "fused" && x.kind === r.kind && x.batch === r.batch && x.length === r.length
  )!;
  r.fused_over_this = fused.ms.median / r.ms.median;
}
if (values.json) {
  console.log(JSON.stringify({ model: values.model, device, quantize, chunk, steps, rounds, rows }, null, 1));
} else {
  const f = (s: Spread) => `${s.median.toFixed(2)} [${s.min.toFixed(2)}-${s.max.toFixed(2)}]`;
  console.log(
    `${device}, ${values.model}${
      quantize === "none" ? "" : ` (${quantize})`
    }: a decode step (${steps} per sample) and a ${chunk}-token prefill run after ` +
      `\`cached\` positions, cases alternated in ${rounds} rounds; median [min-max]`,
  );
  console.log(
    "attention  run      batch  cached  ms                     CPU ms                 fused over this",
  );
  for (const r of rows) {
    console.log(
      `${r.form.padEnd(10)} ${r.kind.padEnd(8)} ${String(r.batch).padEnd(6)} ${String(r.length).padEnd(7)} ${
        f(r.ms).padEnd(22)
      } ${f(r.cpu_ms).padEnd(22)} ${r.fused_over_this.toFixed(2)}x`,
    );
  }
}
