import assert from "node:assert/strict";
import { join } from "node:path";
import { ffnMultToIntermediate, parseConfig } from "../src/model/config.ts";
import { InputError } from "../src/errors.ts";
import { TINY_LLAMA, TINY_NAS } from "./helpers.ts";

const read = async (dir: string) => JSON.parse(await Deno.readTextFile(join(dir, "config.json")));

Deno.test("config: llama checkpoint normalises to full attention + SwiGLU everywhere", async () => {
  const cfg = parseConfig(await read(TINY_LLAMA));
  assert.equal(cfg.modelType, "llama");
  assert.equal(cfg.numLayers, 8);
  assert.equal(cfg.headDim, 64);
  assert.equal(cfg.rope.theta, 10000);
  assert.ok(cfg.tieEmbeddings);
  assert.deepEqual(cfg.eosTokenIds, [0]);
  for (const l of cfg.layers) {
    assert.deepEqual(l, {
      attention: { kind: "full", kvHeads: 2 },
      ffn: { kind: "swiglu", intermediate: 768 },
    });
  }
});

Deno.test("config: nemotron-nas block_configs: layers 3..8 have no attention", async () => {
  const cfg = parseConfig(await read(TINY_NAS));
  assert.equal(cfg.modelType, "nemotron-nas");
  const free = cfg.layers.flatMap((l, i) => (l.attention.kind === "none" ? [i] : []));
  assert.deepEqual(free, [3, 4, 5, 6, 7, 8]);
  assert.deepEqual(cfg.layers[0].attention, { kind: "full", kvHeads: 2 });
});

Deno.test("config: DeciLM ffn_mult, replace_with_linear, no_op and n_heads_in_group", () => {
  const base = {
    model_type: "nemotron-nas",
    vocab_size: 10,
    hidden_size: 768,
    num_hidden_layers: 3,
    num_attention_heads: 12,
  };
  const cfg = parseConfig({
    ...base,
    block_configs: [
      { attention: { n_heads_in_group: 4 }, ffn: { ffn_mult: 2.625 } },
      { attention: { replace_with_linear: true }, ffn: { replace_with_linear: true } },
      { attention: { no_op: true }, ffn: { no_op: true } },
    ],
  });
  assert.deepEqual(cfg.layers[0], {
    attention: { kind: "full", kvHeads: 3 },
    ffn: { kind: "swiglu", intermediate: 1536 },
  });
  assert.deepEqual(cfg.layers[1], { attention: { kind: "linear" }, ffn: { kind: "linear" } });
  assert.deepEqual(cfg.layers[2], { attention: { kind: "none" }, ffn: { kind: "none" } });
  assert.equal(ffnMultToIntermediate(1.3, 4096), 3584);
});

Deno.test("config: NVIDIA's newer block schema (num_key_value_heads, intermediate_size) and parallel_blocks", () => {
  const base = {
    model_type: "nemotron-nas",
    vocab_size: 10,
    hidden_size: 768,
    num_hidden_layers: 2,
    num_attention_heads: 12,
  };
  const full = { attention: { num_key_value_heads: 4 }, ffn: { intermediate_size: 2048 } };
  const cfg = parseConfig({
    ...base,
    block_configs: [
      full,
      {
        attention: null,
        ffn: null,
        parallel_blocks: [full, { attention: { no_op: true }, ffn: { intermediate_size: 1024 } }],
      },
    ],
  });
  assert.deepEqual(cfg.layers[0], {
    attention: { kind: "full", kvHeads: 4 },
    ffn: { kind: "swiglu", intermediate: 2048 },
  });
  assert.deepEqual(cfg.layers[1], {
    attention: { kind: "none" },
    ffn: { kind: "none" },
    parallel: [
      { attention: { kind: "full", kvHeads: 4 }, ffn: { kind: "swiglu", intermediate: 2048 } },
      { attention: { kind: "none" }, ffn: { kind: "swiglu", intermediate: 1024 } },
    ],
  });
  assert.throws(
    () => parseConfig({ ...base, block_configs: [full, { ...full, parallel_blocks: [full] }] }),
    /block_configs\[1\] has parallel_blocks and an attention or FFN of its own/,
  );
  assert.throws(
    () =>
      parseConfig({
        ...base,
        block_configs: [full, { attention: { num_key_value_heads: 5 }, ffn: full.ffn }],
      }),
    /block_configs\[1\].attention: 5 key\/value heads do not divide 12 heads/,
  );
});

Deno.test("config: llama3 rope scaling is read; unknown rope types are refused", async () => {
  const raw = await read(TINY_LLAMA);
  delete raw.rope_parameters;
  const cfg = parseConfig({
    ...raw,
    rope_theta: 500000,
    rope_scaling: {
      rope_type: "llama3",
      factor: 32,
      low_freq_factor: 1,
      high_freq_factor: 4,
      original_max_position_embeddings: 8192,
    },
  });
  assert.equal(cfg.rope.theta, 500000);
  assert.equal(cfg.rope.scaling.kind, "llama3");
  assert.throws(
    () => parseConfig({ ...raw, rope_scaling: { rope_type: "yarn", factor: 2 } }),
    /rope type "yarn" is not supported/,
  );
});

Deno.test("config: bad configs are InputErrors that name the problem", async () => {
  const raw = await read(TINY_LLAMA);
  const cases: [Record<string, unknown>, RegExp][] = [
    [{ ...raw, model_type: "gpt2" }, /unknown model_type "gpt2"/],
    [{ ...raw, hidden_size: -1 }, /hidden_size/],
    [{ ...raw, num_key_value_heads: 3 }, /num_key_value_heads 3 does not divide/],
    [{ ...raw, hidden_act: "gelu" }, /hidden_act "gelu"/],
    [{ ...raw, attention_bias: true }, /attention_bias/],
    [{ ...raw, intermediate_size: undefined }, /intermediate_size is required/],
    [{ ...raw, model_type: "nemotron-nas" }, /needs block_configs/],
    [{ ...raw, model_type: "nemotron-nas", block_configs: [] }, /block_configs has 0 entries/],
    [{ ...raw, vocab_size: "big" }, /vocab_size/],
  ];
  for (const [cfg, re] of cases) {
    assert.throws(
      () => parseConfig(cfg),
      (e: unknown) => e instanceof InputError && re.test(e.message),
      String(re),
    );
  }
});
