import assert from "node:assert/strict";
import { join } from "node:path";
import { loadCheckpoint } from "../src/model/checkpoint.ts";
import { releaseDecoded } from "../src/model/safetensors.ts";
import { InputError } from "../src/errors.ts";
import { NAS_LIKE, TINY_NAS, writeRandomModel } from "./helpers.ts";

const rejects = (p: Promise<unknown>, re: RegExp) =>
  assert.rejects(p, (e: unknown) => e instanceof InputError && re.test(e.message), String(re));

Deno.test("checkpoint: sharded fp16 tiny-nas loads with tied embeddings and no attention in 3..8", async () => {
  const ck = await loadCheckpoint(TINY_NAS);
  assert.equal(ck.layers.length, 12);
  assert.equal(ck.lmHead, ck.embed);
  assert.equal(ck.layers[4].attention, null);
  assert.ok(ck.layers[2].attention);
});

Deno.test("checkpoint: single-file F32 and sharded F16, untied head, linear and no-op blocks", async () => {
  for (const [dtype, sharded] of [["F32", false], ["F16", true]] as const) {
    const dir = await writeRandomModel({ ...NAS_LIKE, dtype, sharded, tie: false });
    const ck = await loadCheckpoint(dir);
    assert.notEqual(ck.lmHead, ck.embed);
    assert.ok(ck.layers[5].attention && "weight" in ck.layers[5].attention);
    assert.ok(ck.layers[6].ffn && "weight" in ck.layers[6].ffn);
    assert.equal(ck.layers[7].ffn, null);
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("checkpoint: missing, corrupt and inconsistent checkpoints are InputErrors", async () => {
  await rejects(loadCheckpoint("/definitely/not/here"), /does not exist/);
  const dir = await writeRandomModel({ ...NAS_LIKE, sharded: true });
  const index = JSON.parse(await Deno.readTextFile(join(dir, "model.safetensors.index.json")));

  await Deno.writeTextFile(join(dir, "config.json"), "{ not json");
  await rejects(loadCheckpoint(dir), /config.json is not valid JSON/);
  const config = {
    model_type: "bert",
    vocab_size: 1,
    hidden_size: 1,
    num_hidden_layers: 1,
    num_attention_heads: 1,
  };
  await Deno.writeTextFile(join(dir, "config.json"), JSON.stringify(config));
  await rejects(loadCheckpoint(dir), /unknown model_type "bert"/);

  const dir2 = await writeRandomModel({ ...NAS_LIKE, sharded: true });
  const shard = join(dir2, "model-00002-of-00002.safetensors");
  const bytes = await Deno.readFile(shard);
  await Deno.writeFile(shard, bytes.slice(0, bytes.length - 100));
  await rejects(
    loadCheckpoint(dir2),
    /model-00002-of-00002.safetensors: tensor ".*": data_offsets end \d+ is past the end/,
  );

  const dir3 = await writeRandomModel({ ...NAS_LIKE, sharded: true });
  const bad = { ...index, weight_map: { ...index.weight_map } };
  delete bad.weight_map["model.layers.2.mlp.up_proj.weight"];
  await Deno.writeTextFile(join(dir3, "model.safetensors.index.json"), JSON.stringify(bad));
  await rejects(loadCheckpoint(dir3), /missing tensor "model.layers.2.mlp.up_proj.weight"/);

  const cfg3 = JSON.parse(await Deno.readTextFile(join(dir3, "config.json")));
  await Deno.writeTextFile(join(dir3, "model.safetensors.index.json"), JSON.stringify(index));
  cfg3.block_configs[2].ffn.intermediate_size = 65;
  await Deno.writeTextFile(join(dir3, "config.json"), JSON.stringify(cfg3));
  await rejects(
    loadCheckpoint(dir3),
    /"model.layers.2.mlp.gate_proj.weight" has shape \[64,64\] but the config implies \[65,64\]/,
  );

  await Deno.remove(join(dir3, "model.safetensors.index.json"));
  await Deno.remove(join(dir3, "model-00001-of-00002.safetensors"));
  await rejects(loadCheckpoint(dir3), /no model.safetensors or model.safetensors.index.json/);
  for (const d of [dir, dir2, dir3]) await Deno.remove(d, { recursive: true });
});

Deno.test("checkpoint: its norms are its own, left whole when a build frees the tensors it decoded", async () => {
  const ck = await loadCheckpoint(TINY_NAS);
  // In the loading task, as a build that follows it at once would.
  releaseDecoded();
  assert.equal(ck.finalNorm.length, ck.config.hidden);
  for (const l of ck.layers) if (l.ffn) assert.equal(l.ffn.norm.length, ck.config.hidden);
});
