/**
 * What constrained decoding costs at a checkpoint's vocabulary, apart from the model: building
 * xgrammar's tables of the vocabulary (once a process, at the first constrained request), compiling a
 * typical JSON schema (once a schema: `rounds` distinct ones), the tool calls of a request offering
 * three functions no request offered before (Hermes format, tool_choice auto and required), and one
 * step's mask of one row (a matcher's bitmask
 * applied to the logits), as median [min-max].
 *
 *   scripts/deno run -A bench/studies/grammar_cost.ts [--model DIR] [--rounds 10] [--json]
 *
 * For a 128K vocabulary without downloading one: `scripts/synth_checkpoint.ts --model llama-3.2-1b`.
 */
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { fail, positive, scriptFlags } from "../../scripts/args.ts";
import { spread } from "../../src/numeric.ts";
import { loadConfig } from "../../src/model/checkpoint.ts";
import { TextTokenizer } from "../../src/model/tokenizer.ts";
import { Grammars } from "../../src/sampling/grammar.ts";
import { HERMES, toolCallTag } from "../../src/model/tool_calls.ts";

const root = fileURLToPath(new URL("../..", import.meta.url));
const values = scriptFlags({
  model: { type: "string", default: join(root, "models", "tiny-nas") },
  rounds: { type: "string", default: "10" },
  json: { type: "boolean", default: false },
});
const rounds = positive("rounds", values.rounds!);
const dir = values.model!;
const [config, tokenizer] = await Promise.all([loadConfig(dir), TextTokenizer.load(dir)]).catch((e) =>
  fail(`--model: ${(e as Error).message}`)
);
const grammars = new Grammars(() => tokenizer.vocabularyInfo(config.vocabSize));

/** A schema of the usual kind: nested object, array, enum, pattern; `i` makes each one new to the cache. */
const schema = (i: number) =>
  JSON.stringify({
    title: `case ${i}`,
    type: "object",
    properties: {
      name: { type: "string" },
      age: { type: "integer", minimum: 0 },
      role: { enum: ["admin", "user", "guest"] },
      tags: { type: "array", items: { type: "string" }, maxItems: 8 },
      address: {
        type: "object",
        properties: { city: { type: "string" }, zip: { type: "string", pattern: "^[0-9]{5}$" } },
        required: ["city"],
      },
    },
    required: ["name", "age", "role"],
  });

/** Three functions with the usual parameters; `i` names them anew, so no cache has seen them. */
const toolTag = (i: number, choice: "auto" | "required") =>
  JSON.stringify(toolCallTag(HERMES, {
    functions: ["search", "weather", "book"].map((name) => ({
      name: `${name}_${i}`,
      parameters: JSON.parse(schema(i)),
    })),
    choice,
    parallel: true,
  }));

const time = async (f: () => Promise<unknown>) => {
  const t0 = performance.now();
  await f();
  return performance.now() - t0;
};
const tablesMs = await time(() => grammars.compile({ field: "x", type: "json" }));
const compileMs: number[] = [];
for (let i = 0; i < rounds; i++) {
  compileMs.push(await time(() => grammars.compile({ field: "x", type: "json_schema", schema: schema(i) })));
}
const toolsMs = { auto: [] as number[], required: [] as number[] };
for (let i = 0; i < rounds; i++) {
  for (const choice of ["auto", "required"] as const) {
    const tag = toolTag(rounds + 2 * i + (choice === "auto" ? 0 : 1), choice);
    toolsMs[choice].push(await time(() => grammars.compile({ field: "x", type: "structural_tag", tag })));
  }
}
const matcher = await grammars.matcher(
  { field: "x", type: "json_schema", schema: schema(0) },
  config.eosTokenIds,
);
const row = new Float32Array(config.vocabSize);
await matcher.mask(row);
const maskMs: number[] = [];
for (let i = 0; i < rounds; i++) {
  maskMs.push(
    await time(async () => {
      for (let k = 0; k < 20; k++) await matcher.mask(row);
    }) / 20,
  );
}
const report = {
  model: dir,
  vocab: config.vocabSize,
  tables_ms: tablesMs,
  schema_compile_ms: spread(compileMs),
  tools_auto_compile_ms: spread(toolsMs.auto),
  tools_required_compile_ms: spread(toolsMs.required),
  mask_ms_per_row: spread(maskMs),
};
if (values.json) console.log(JSON.stringify(report));
else {
  const sp = (s: { median: number; min: number; max: number }, d = 1) =>
    `${s.median.toFixed(d)} [${s.min.toFixed(d)}-${s.max.toFixed(d)}]`;
  console.log(
    `grammar cost at a ${report.vocab}-token vocabulary (${dir}; ${rounds} rounds, median [min-max])`,
  );
  console.log(
    `engine loaded, vocabulary tables built, JSON grammar compiled (once a process): ${
      tablesMs.toFixed(0)
    } ms`,
  );
  console.log(`a typical JSON schema compiled:     ${sp(report.schema_compile_ms)} ms`);
  console.log(`three new functions, tool_choice auto:     ${sp(report.tools_auto_compile_ms)} ms`);
  console.log(`three new functions, tool_choice required: ${sp(report.tools_required_compile_ms)} ms`);
  console.log(`one row's mask in a decode step:    ${sp(report.mask_ms_per_row, 3)} ms`);
}
