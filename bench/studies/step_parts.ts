/**
 * Where a batched decode step's time goes, on the device the script runs on: the model's decoder
 * graph whole, without its attention blocks, without its FFN blocks, and with no blocks at all (the
 * embedding, final norm and LM head), each timed at every batch size from the same prefix. Cases are
 * warmed, then alternated in rounds; ms per step and tokens/s as median [min-max].
 *
 * The partial graphs compute nothing useful: they isolate the cost of the GEMMs (FFN and LM head, whose
 * arithmetic grows with the rows) from attention's many small operators (whose cost is mostly per
 * operator and per cached position), which is what bounds the gain of batching on a CPU.
 *
 *   scripts/deno run -A bench/studies/step_parts.ts [--model DIR] [--batch 1,16] [--prefix 64] [--steps 24]
 *     [--rounds 5] [--parts whole,no-attention,no-ffn,lm-head] [--json]
 *
 * Each part's session stays loaded for the alternation: for a model whose graphs cannot all fit WASM's
 * heap together, name fewer parts.
 */
import { join } from "node:path";
import { fail, positive, scriptFlags } from "../../scripts/args.ts";
import { fileURLToPath } from "node:url";
import { batchStepTimes } from "../../src/bench/decode_bench.ts";
import { inRounds } from "../../src/bench/rounds.ts";
import type { Block } from "../../src/model/blocks.ts";
import { type Spread, spread } from "../../src/numeric.ts";
import { buildDecoderGraph } from "../../src/onnx/decoder.ts";
import { loadAssets } from "../../src/instance/build.ts";
import { ModelSession } from "../../src/ort/session.ts";

const root = fileURLToPath(new URL("../..", import.meta.url));
const values = scriptFlags({
  model: { type: "string", default: join(root, "models", "tiny-nas") },
  batch: { type: "string", default: "1,16" },
  prefix: { type: "string", default: "64" },
  steps: { type: "string", default: "24" },
  rounds: { type: "string", default: "5" },
  parts: { type: "string", default: "whole,no-attention,no-ffn,lm-head" },
  json: { type: "boolean", default: false },
});
const sizes = values.batch!.split(",").map((s) => positive("batch", s));
const prefixLength = positive("prefix", values.prefix!);
const steps = positive("steps", values.steps!);
const rounds = positive("rounds", values.rounds!);

const assets = await loadAssets(values.model!).catch((e) =>
  fail(`--model ${values.model}: ${(e as Error).message}`)
);
const cfg = assets.checkpoint.config;
const text = await Deno.readTextFile(join(root, "data", "eval.py.txt"));
const ids = assets.tokenizer.encode(text.slice(0, prefixLength * 16)).slice(0, prefixLength + 1);
if (ids.length <= prefixLength || prefixLength + steps + 1 >= cfg.maxPositions) {
  fail(`--prefix ${prefixLength} with --steps ${steps} does not fit the text or the context`);
}

const parts: Record<string, Block[]> = {
  whole: assets.blocks,
  "no-attention": assets.blocks.filter((b) => b.kind !== "attention"),
  "no-ffn": assets.blocks.filter((b) => b.kind !== "ffn"),
  "lm-head": [],
};
const chosen = values.parts!.split(",");
const unknown = chosen.filter((p) => !(p in parts));
if (unknown.length || chosen.length === 0) {
  fail(`--parts: unknown ${unknown.join(", ")}; choose from ${Object.keys(parts).join(", ")}`);
}
const sessions = new Map<string, ModelSession>();
for (const name of chosen) {
  sessions.set(
    name,
    await ModelSession.create(buildDecoderGraph(assets.checkpoint, parts[name]), "wasm", cfg.vocabSize),
  );
}

const cases = [...sessions.keys()].flatMap((part) => sizes.map((batch) => ({ part, batch })));
/** One sample: `steps` batched steps after the prefix, every row continuing it. */
const samples = await inRounds(
  cases,
  rounds,
  ({ part, batch }) => batchStepTimes(sessions.get(part)!, ids, prefixLength, batch, steps),
);
for (const s of sessions.values()) await s.release();

interface Row {
  part: string;
  batch: number;
  ms_per_step: Spread;
  cpu_ms_per_step: Spread;
  tokens_per_second: Spread;
  /** Median tokens/s over the same part's at the first batch size. */
  over_first: number;
}
const rows: Row[] = cases.map((c, i) => ({
  ...c,
  ms_per_step: spread(samples[i].map((x) => x.ms)),
  cpu_ms_per_step: spread(samples[i].map((x) => x.cpuMs)),
  tokens_per_second: spread(samples[i].map((x) => (c.batch * 1000) / x.ms)),
  over_first: 0,
}));
for (const r of rows) {
  const first = rows.find((x) => x.part === r.part && x.batch === sizes[0])!;
  r.over_first = r.tokens_per_second.median / first.tokens_per_second.median;
}
if (values.json) {
  console.log(JSON.stringify({ model: values.model, prefix: prefixLength, steps, rounds, rows }, null, 1));
} else {
  const f = (s: Spread, digits = 2) =>
    `${s.median.toFixed(digits)} [${s.min.toFixed(digits)}-${s.max.toFixed(digits)}]`;
  console.log(
    `decode steps of ${values.model} on WASM from a ${prefixLength}-token prefix, ${steps} steps per sample, ` +
      `cases alternated in ${rounds} rounds; median [min-max]`,
  );
  console.log(
    "graph          batch  ms per step          CPU ms per step      tokens/s                 over first batch",
  );
  for (const r of rows) {
    console.log(
      `${r.part.padEnd(14)} ${String(r.batch).padEnd(6)} ${f(r.ms_per_step).padEnd(20)} ${
        f(r.cpu_ms_per_step).padEnd(20)
      } ${f(r.tokens_per_second, 0).padEnd(24)} ${r.over_first.toFixed(2)}x`,
    );
  }
}
