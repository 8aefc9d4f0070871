/**
 * Writes a random-weight checkpoint in the exact Hugging Face layout of a named real model, for tests
 * and benchmarks at real shapes where real weights cannot be downloaded: config.json as published,
 * bf16 tensors under their HF names, sharded safetensors with model.safetensors.index.json,
 * generation_config.json, and a byte-level BPE tokenizer.json covering the whole vocabulary (the
 * shipped tokenizer, its vocabulary extended with placeholder tokens `<tN>` up to the model's size).
 *
 *   scripts/deno run -A scripts/synth_checkpoint.ts --model llama-3.2-1b --out DIR [--layers N]
 *     [--shard-mb 2000] [--seed 1]
 *
 * Weights are random but scaled like a trained model's: projections N(0, 1/in), output projections
 * (o_proj, down_proj) further scaled by 1/sqrt(2 * layers) so the residual stream stays bounded
 * through every layer, norms 1, embeddings N(0, 0.02^2). Tensors are generated in parallel by a pool
 * of workers (scripts/synth_tensor.ts), each from its own seed and written in chunks at its offset, so
 * a 1B checkpoint takes seconds on a many-core machine and memory stays at a few chunks.
 */
import { join } from "node:path";
import { fail, positive, scriptFlags } from "./args.ts";
import { PUBLISHED_CONFIGS as MODELS } from "../src/model/published_configs.ts";
import type { TensorJob } from "./synth_tensor.ts";

/**
 * A Nemotron-NAS style model at the 1B shapes: attention removed from a run of layers in the middle
 * (the paper's setting, an attention-free run for FFN Fusion), two-thirds of the way as in
 * Llama-3.1-Nemotron-51B's pattern, with DeciLM block_configs.
 */
function nasConfig(layers: number): Record<string, unknown> {
  const base = { ...MODELS["llama-3.2-1b"] };
  const free = new Set(Array.from({ length: Math.floor(layers / 2) }, (_, i) => Math.floor(layers / 4) + i));
  return {
    ...base,
    architectures: ["DeciLMForCausalLM"],
    model_type: "nemotron-nas",
    num_hidden_layers: layers,
    block_configs: Array.from({ length: layers }, (_, i) => ({
      attention: free.has(i)
        ? { no_op: true, replace_with_linear: false, n_heads_in_group: null }
        : { no_op: false, replace_with_linear: false, n_heads_in_group: 4 },
      ffn: { no_op: false, replace_with_linear: false, ffn_mult: null, intermediate_size: 8192 },
    })),
  };
}

const values = scriptFlags({
  model: { type: "string" },
  out: { type: "string" },
  layers: { type: "string" },
  "shard-mb": { type: "string", default: "2000" },
  seed: { type: "string", default: "1" },
});
const names = [...Object.keys(MODELS), "nemotron-nas-1b"];
if (!values.model || !names.includes(values.model) || !values.out) {
  fail(`usage: synth_checkpoint.ts --model ${names.join("|")} --out DIR [--layers N] [--shard-mb 2000]`);
}
const fullLayers = values.model === "nemotron-nas-1b" ? 16 : MODELS[values.model].num_hidden_layers as number;
const layers = values.layers ? positive("layers", values.layers) : fullLayers;
const config = values.model === "nemotron-nas-1b"
  ? nasConfig(layers)
  : { ...MODELS[values.model], num_hidden_layers: layers };
const d = config.hidden_size as number;
const heads = config.num_attention_heads as number;
const hd = config.head_dim as number;
const kvHeads = config.num_key_value_heads as number;
const ffn = config.intermediate_size as number;
const vocab = config.vocab_size as number;
const blockConfigs = config.block_configs as { attention: { no_op: boolean } }[] | undefined;

/** name, shape, standard deviation (0: a norm gain of ones). */
const tensors: [string, number[], number][] = [["model.embed_tokens.weight", [vocab, d], 0.02]];
const residual = 1 / Math.sqrt(2 * layers);
for (let i = 0; i < layers; i++) {
  const p = `model.layers.${i}`;
  if (!blockConfigs?.[i].attention.no_op) {
    const kv = blockConfigs ? heads / 4 : kvHeads;
    tensors.push(
      [`${p}.input_layernorm.weight`, [d], 0],
      [`${p}.self_attn.q_proj.weight`, [heads * hd, d], 1 / Math.sqrt(d)],
      [`${p}.self_attn.k_proj.weight`, [kv * hd, d], 1 / Math.sqrt(d)],
      [`${p}.self_attn.v_proj.weight`, [kv * hd, d], 1 / Math.sqrt(d)],
      [`${p}.self_attn.o_proj.weight`, [d, heads * hd], residual / Math.sqrt(heads * hd)],
    );
  }
  tensors.push(
    [`${p}.post_attention_layernorm.weight`, [d], 0],
    [`${p}.mlp.gate_proj.weight`, [ffn, d], 1 / Math.sqrt(d)],
    [`${p}.mlp.up_proj.weight`, [ffn, d], 1 / Math.sqrt(d)],
    [`${p}.mlp.down_proj.weight`, [d, ffn], residual / Math.sqrt(ffn)],
  );
}
tensors.push(["model.norm.weight", [d], 0]);
if (!config.tie_word_embeddings) tensors.push(["lm_head.weight", [vocab, d], 1 / Math.sqrt(d)]);

// Shards: consecutive tensors up to --shard-mb each.
const shardBytes = positive("shard-mb", values["shard-mb"]!, false) * 1e6;
const shards: [string, number[], number][][] = [[]];
let size = 0;
for (const t of tensors) {
  const bytes = t[1].reduce((a, b) => a * b, 1) * 2;
  if (size > 0 && size + bytes > shardBytes) {
    shards.push([]);
    size = 0;
  }
  shards.at(-1)!.push(t);
  size += bytes;
}

const out = values.out;
await Deno.mkdir(out, { recursive: true });
const seed = positive("seed", values.seed!);
const PART = 1 << 24;
type Job = { name: string; shape: number[]; last: boolean; job: TensorJob };
/** Runs the jobs on a pool of workers, largest first so that none is left alone at the end. */
async function runJobs(all: Job[]): Promise<void> {
  const queue = [...all].sort((a, b) => b.job.n - a.job.n);
  const url = new URL("./synth_tensor.ts", import.meta.url);
  const workers = Math.max(1, Math.min(navigator.hardwareConcurrency, queue.length));
  await Promise.all(Array.from({ length: workers }, async () => {
    const worker = new Worker(url, { type: "module" });
    try {
      for (let t = queue.shift(); t; t = queue.shift()) {
        const job = t.job;
        const done = await new Promise<{ ok: boolean; error?: string }>((resolve, reject) => {
          worker.onmessage = (e) => resolve(e.data);
          worker.onerror = (e) => reject(new Error(e.message));
          worker.postMessage(job);
        });
        if (!done.ok) throw new Error(`${t.name}: ${done.error}`);
        if (t.last) console.error(`synth: ${t.name} [${t.shape}]`);
      }
    } finally {
      worker.terminate();
    }
  }));
}

const jobs: Job[] = [];
const weightMap: Record<string, string> = {};
let total = 0;
for (const [k, shard] of shards.entries()) {
  const file = `model-${String(k + 1).padStart(5, "0")}-of-${
    String(shards.length).padStart(5, "0")
  }.safetensors`;
  const header: Record<string, unknown> = { __metadata__: { format: "pt" } };
  let offset = 0;
  for (const [name, shape] of shard) {
    const bytes = shape.reduce((a, b) => a * b, 1) * 2;
    header[name] = { dtype: "BF16", shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
    weightMap[name] = file;
  }
  total += offset;
  let json = JSON.stringify(header);
  while ((json.length + 8) % 8 !== 0) json += " ";
  const f = await Deno.open(join(out, file), { write: true, create: true, truncate: true });
  const head = new Uint8Array(8 + json.length);
  new DataView(head.buffer).setBigUint64(0, BigInt(json.length), true);
  head.set(new TextEncoder().encode(json), 8);
  await f.write(head);
  // The file at its full size, so the workers' writes land inside it.
  await f.truncate(head.length + offset);
  f.close();
  let at = head.length;
  for (const [name, shape, std] of shard) {
    const n = shape.reduce((a, b) => a * b, 1);
    // Parts of at most PART values, each its own job and seed: an embedding is not one worker's minute.
    for (let from = 0; from < n; from += PART) {
      const job = { file: join(out, file), offset: at + 2 * from, n: Math.min(PART, n - from), std };
      jobs.push({ name, shape, last: from + PART >= n, job: { ...job, seed: seed + jobs.length * 7919 } });
    }
    at += n * 2;
  }
}
await runJobs(jobs);
await Deno.writeTextFile(
  join(out, "model.safetensors.index.json"),
  JSON.stringify({ metadata: { total_size: total }, weight_map: weightMap }, null, 1),
);
await Deno.writeTextFile(join(out, "config.json"), JSON.stringify(config, null, 1));
await Deno.writeTextFile(
  join(out, "generation_config.json"),
  JSON.stringify({ bos_token_id: config.bos_token_id, eos_token_id: config.eos_token_id }, null, 1),
);
const tokenizer = JSON.parse(
  await Deno.readTextFile(new URL("../models/tiny-nas/tokenizer.json", import.meta.url)),
);
const known = new Set(Object.values(tokenizer.model.vocab as Record<string, number>));
for (const t of tokenizer.added_tokens as { id: number }[]) known.add(t.id);
for (let id = 0; id < vocab; id++) if (!known.has(id)) tokenizer.model.vocab[`<t${id}>`] = id;
await Deno.writeTextFile(join(out, "tokenizer.json"), JSON.stringify(tokenizer));
console.log(JSON.stringify({ out, model: values.model, layers, shards: shards.length, bytes: total }));
