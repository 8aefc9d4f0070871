import assert from "node:assert/strict";
import { join } from "node:path";
import { exportCheckpoint, healSection } from "../src/export/write.ts";
import { InputError } from "../src/errors.ts";
import { labelBlocks } from "../src/fusion/analyze.ts";
import { checkPlan, type FusionPlan, parsePlan, UNFUSED } from "../src/fusion/plan.ts";
import { ffnMultToIntermediate, parseConfig } from "../src/model/config.ts";
import { buildInstance, loadAssets } from "../src/instance/build.ts";
import {
  EVAL_TEXT,
  golden,
  NAS_LIKE,
  relL2,
  ROOT,
  TINY_LLAMA,
  TINY_NAS,
  writeRandomModel,
} from "./helpers.ts";

/** Last logits of `ids` from the plan served in memory and from the exported checkpoint served unfused. */
async function roundTrip(dir: string, plan: FusionPlan, ids: number[][], dtype: "fp32" | "bf16" = "fp32") {
  const out = await Deno.makeTempDir({ prefix: "fusedge-export-" });
  try {
    const assets = await loadAssets(dir, {}, EVAL_TEXT);
    const summary = await exportCheckpoint({ assets, plan, out, dtype, force: true, maxShardBytes: 4e6 });
    const exported = await loadAssets(out);
    const inMemory = await buildInstance(assets, plan, "wasm");
    const reloaded = await buildInstance(exported, UNFUSED, "wasm");
    const pairs = [];
    for (const p of ids) pairs.push([await inMemory.logitsOf(p), await reloaded.logitsOf(p)]);
    await inMemory.release();
    await reloaded.release();
    const config = JSON.parse(await Deno.readTextFile(join(out, "config.json")));
    const card = await Deno.readTextFile(join(out, "README.md"));
    return { summary, pairs, config, out, card };
  } finally {
    await Deno.remove(out, { recursive: true });
  }
}

const last = (logits: Float32Array, vocab: number) => logits.subarray(logits.length - vocab);

Deno.test("export: a v1 plan on tiny-nas, written as Nemotron-NAS and served back, gives the same logits (1e-5)", async () => {
  const cases = (await golden(TINY_NAS)).cases;
  const plan = parsePlan({ ffn_groups: [[3, 4, 5], [6, 7, 8]] });
  const { summary, pairs, config } = await roundTrip(TINY_NAS, plan, cases.map((c) => c.input_ids));
  assert.equal(summary.layers, 8, "each group of three is one layer");
  assert.ok(summary.shards.length > 1, `sharded at 4 MB: ${summary.shards}`);
  for (const [a, b] of pairs) assert.ok(relL2(last(b, 4096), last(a, 4096)) <= 1e-5);
  assert.equal(config.model_type, "nemotron-nas");
  assert.equal(config.num_hidden_layers, 8);
  assert.deepEqual(config.block_configs[3], {
    attention: { no_op: true, replace_with_linear: false, n_heads_in_group: null },
    ffn: { no_op: false, replace_with_linear: false, ffn_mult: 13.5, intermediate_size: 2304 },
  });
});

Deno.test("export: a healed plan is written with its fitted weights (same logits, 1e-5) and its healing in the model card", async () => {
  const cases = (await golden(TINY_NAS)).cases;
  const plan = parsePlan({
    ffn_groups: [[3, 4, 5, 6, 7, 8]],
    heal: { skip_tokens: 65536, calibration_tokens: 1024, heldout_tokens: 1024 },
  });
  const { summary, pairs, card } = await roundTrip(TINY_NAS, plan, cases.slice(0, 2).map((c) => c.input_ids));
  assert.equal(summary.plan, "ffn[3-8]+heal(1024@65536/1024)");
  for (const [a, b] of pairs) assert.ok(relL2(last(b, 4096), last(a, 4096)) <= 1e-5);
  assert.match(card, /## Healing/);
  assert.match(card, /\| 3-8 \| ridge \S+ \| /, "healed: the export carries fitted input maps");
});

Deno.test("export: the model card's healing table reads stages by objective (a block group has no input maps)", () => {
  const stage = (objective: "member_input" | "down_projection", kept: boolean) => ({
    objective,
    kept,
    ridge: kept ? 0.1 : null,
    residual: { calibration: { before: 1, after: 1 }, heldout: { before: 1, after: 1 } },
    tried: [],
  });
  const group = (kind: "ffn" | "block", layers: number[], stages: ReturnType<typeof stage>[]) => ({
    kind,
    layers,
    healed: stages.some((s) => s.kept),
    stages,
    heldout_loss: { unhealed: 2.5, healed: 2.4 },
    ms: 1,
  });
  const card = healSection({
    plan: "x",
    calibration_tokens: 4096,
    heldout_tokens: 1024,
    groups: [
      group("ffn", [3, 4, 5], [stage("member_input", true), stage("down_projection", false)]),
      group("block", [8, 9], [stage("down_projection", true)]),
    ],
  }).join("\n");
  assert.match(card, /\| 3-5 \| ridge 0\.1 \| not kept \| 2\.5000 \| 2\.4000 \|/);
  assert.match(card, /\| blk 8-9 \| - \| ridge 0\.1 \| 2\.5000 \| 2\.4000 \|/);
  assert.deepEqual(healSection(undefined), []);
});

Deno.test("export: a v2 plan on tiny-llama (attention removed and linear, FFNs fused across) round-trips (1e-5)", async () => {
  const cases = (await golden(TINY_LLAMA)).cases;
  const plan = parsePlan({ version: 2, attention: { remove: [3], linear: [6] }, ffn_groups: [[2, 3]] });
  const { summary, pairs, config } = await roundTrip(TINY_LLAMA, plan, cases.map((c) => c.input_ids));
  assert.equal(summary.layers, 7);
  for (const [a, b] of pairs) assert.ok(relL2(last(b, 4096), last(a, 4096)) <= 1e-5);
  assert.equal(config.block_configs[2].ffn.intermediate_size, 1536);
  assert.equal(config.block_configs[5].attention.replace_with_linear, true);
  assert.equal(config.block_configs[0].attention.n_heads_in_group, 2);
});

Deno.test("export: block groups and a linear attention beside a fused FFN are parallel_blocks, read back the same (1e-5)", async () => {
  const cases = (await golden(TINY_LLAMA)).cases;
  for (
    const [raw, layers] of [
      [{ version: 2, block_groups: [[6, 7]] }, 7],
      // Layer 2's attention is a layer of its own: a DeciLM layer has parallel blocks or an attention, not both.
      [{ version: 2, attention: { remove: [3], linear: [4] }, ffn_groups: [[2, 3, 4]] }, 7],
    ] as const
  ) {
    const plan = parsePlan(raw);
    const { summary, pairs, config } = await roundTrip(TINY_LLAMA, plan, cases.map((c) => c.input_ids));
    assert.equal(summary.layers, layers, JSON.stringify(raw));
    for (const [a, b] of pairs) assert.ok(relL2(last(b, 4096), last(a, 4096)) <= 1e-5, JSON.stringify(raw));
    const parallel = config.block_configs.filter((b: { parallel_blocks?: unknown[] }) => b.parallel_blocks);
    assert.equal(parallel.length, 1);
    assert.equal(parallel[0].parallel_blocks.length, 2);
    assert.equal(parallel[0].attention.no_op, true);
  }
});

Deno.test("export: widths pad to a multiple of 256 with zeros, ffn_mult maps to them, every layer kind survives", async () => {
  const dir = await writeRandomModel(NAS_LIKE);
  try {
    const plan = parsePlan({ ffn_groups: [[2, 3, 4]] });
    const ids = [[1, 5, 9, 200, 31, 7], [42, 3]];
    const { pairs, config } = await roundTrip(dir, plan, ids);
    for (const [a, b] of pairs) assert.ok(relL2(b, a) <= 1e-5, `${relL2(b, a)}`);
    const parsed = parseConfig(config);
    assert.deepEqual(parsed.layers.map((l) => l.ffn.kind === "swiglu" ? l.ffn.intermediate : l.ffn.kind), [
      256,
      256,
      256,
      256,
      "linear",
      "none",
    ]);
    assert.deepEqual(parsed.layers.map((l) => l.attention.kind), [
      "full",
      "full",
      "none",
      "linear",
      "full",
      "full",
    ]);
    for (const b of config.block_configs) {
      if (b.ffn.intermediate_size) {
        assert.equal(ffnMultToIntermediate(b.ffn.ffn_mult, config.hidden_size), b.ffn.intermediate_size);
      }
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("export: bf16 weights load back within bf16's rounding", async () => {
  const cases = (await golden(TINY_NAS)).cases;
  const { pairs, config } = await roundTrip(TINY_NAS, UNFUSED, [cases[0].input_ids], "bf16");
  assert.equal(config.torch_dtype, "bfloat16");
  const err = relL2(last(pairs[0][1], 4096), last(pairs[0][0], 4096));
  assert.ok(err > 0 && err < 3e-2, `bf16 round trip ${err}`);
});

async function cli(args: string[]) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", join(ROOT, "main.ts"), "export", ...args],
    stdout: "piped",
    stderr: "piped",
  }).output();
  return {
    code: out.code,
    stdout: new TextDecoder().decode(out.stdout),
    stderr: new TextDecoder().decode(out.stderr),
  };
}

Deno.test("cli export: the model card, --force for a non-empty --out, a bad plan exits 2", async () => {
  const work = await Deno.makeTempDir({ prefix: "fusedge-export-cli-" });
  try {
    const plan = join(work, "plan.json");
    await Deno.writeTextFile(plan, JSON.stringify({ ffn_groups: [[3, 4, 5]] }));
    const out = join(work, "out");
    const ok = await cli(["--plan", plan, "--out", out, "--eval-tokens", "64", "--device", "wasm"]);
    assert.equal(ok.code, 0, ok.stderr);
    assert.equal(JSON.parse(ok.stdout).layers, 10);
    const card = await Deno.readTextFile(join(out, "README.md"));
    assert.match(card, /\| 3 \| 3, 4, 5 \| no-op \| SwiGLU 2304 \(fused 3\) \|/);
    assert.match(card, /\| ffn\[3-5\] \| \d\.\d{4} \| \d+\.\d{3} \| \d\.\d{4} \| \d\.\d{3} \|/);
    assert.deepEqual(
      JSON.parse(await Deno.readTextFile(join(out, "config.json"))).torch_dtype,
      "float16",
      "the source's dtype by default",
    );
    const again = await cli(["--plan", plan, "--out", out]);
    assert.equal(again.code, 2);
    assert.match(again.stderr, /--out: .* is not empty \(give --force/);
    assert.equal((await cli(["--plan", plan, "--out", out, "--force"])).code, 0);
    const bad = join(work, "bad.json");
    await Deno.writeTextFile(bad, JSON.stringify({ ffn_groups: [[1, 2]] }));
    const refused = await cli(["--plan", bad, "--out", join(work, "x")]);
    assert.equal(refused.code, 2);
    assert.match(refused.stderr, /layer 2 has attention/);
    const missing = await cli(["--out", join(work, "z")]);
    assert.equal(missing.code, 2);
    assert.match(missing.stderr, /--plan/);
  } finally {
    await Deno.remove(work, { recursive: true });
  }
});

Deno.test("plans: a layer of parallel blocks joins no group", () => {
  const config = parseConfig({
    model_type: "nemotron-nas",
    vocab_size: 10,
    hidden_size: 64,
    num_hidden_layers: 3,
    num_attention_heads: 4,
    block_configs: [
      { attention: { no_op: true }, ffn: { intermediate_size: 256 } },
      { parallel_blocks: [{ attention: { no_op: true }, ffn: { intermediate_size: 256 } }] },
      { attention: { no_op: true }, ffn: { intermediate_size: 256 } },
    ],
  });
  for (const raw of [{ ffn_groups: [[0, 1]] }, { version: 2, block_groups: [[1, 2]] }]) {
    assert.throws(() => checkPlan(parsePlan(raw), config), /layer 1 is already a layer of parallel blocks/);
  }
});

Deno.test("analysis: a checkpoint with parallel blocks is refused as bad input, not a crash", () => {
  assert.throws(
    () => labelBlocks([{ kind: "parallel_blocks", members: [] }]),
    (e) => e instanceof InputError && e.field === "model" && /parallel blocks/.test(e.message),
  );
});
