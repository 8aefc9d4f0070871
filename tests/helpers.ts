import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { encodeSafetensors } from "../src/model/safetensors.ts";
import { type Tensor, tensor } from "../src/model/tensor.ts";
import { rng, type Spread } from "../src/numeric.ts";
import { resolveDevice, webgpuAvailable } from "../src/ort/ort.ts";

export const ROOT = fileURLToPath(new URL("..", import.meta.url));
export const MODELS = join(ROOT, "models");
export const TINY_NAS = join(MODELS, "tiny-nas");
export const TINY_LLAMA = join(MODELS, "tiny-llama");
export const EVAL_TEXT = join(ROOT, "data", "eval.py.txt");

export interface GoldenCase {
  prompt: string;
  input_ids: number[];
  last_logits: number[];
  first_logits: number[];
  greedy_ids: number[];
}

export async function golden(dir: string): Promise<{ cases: GoldenCase[] }> {
  return JSON.parse(await Deno.readTextFile(join(dir, "golden.json")));
}

export { relL2 } from "../src/numeric.ts";

/** WebGPU tests run wherever an adapter exists (lavapipe in CI); they are ignored, loudly, elsewhere. */
export const HAS_WEBGPU = await webgpuAvailable();
if (!HAS_WEBGPU) console.warn("no WebGPU adapter: WebGPU tests are skipped (install mesa-vulkan-drivers)");

/** Native onnxruntime (`--device cpu`) tests run where onnxruntime-node loads; elsewhere they are ignored, loudly. */
export const HAS_NATIVE = await resolveDevice("cpu").then(() => true, (e) => {
  console.warn(`native onnxruntime does not load here: --device cpu tests are skipped (${e.message})`);
  return false;
});

export type LayerDesc = {
  attention: "full" | "none" | "linear";
  ffn: "swiglu" | "none" | "linear";
  kvGroup?: number;
  intermediate?: number;
};

export interface RandomModelSpec {
  modelType: "llama" | "nemotron-nas";
  hidden: number;
  heads: number;
  kvHeads: number;
  intermediate: number;
  layers: LayerDesc[];
  dtype?: "F32" | "F16";
  sharded?: boolean;
  tie?: boolean;
  seed?: number;
}

/** Writes a complete random checkpoint directory (config, safetensors, the shipped tokenizer). */
export async function writeRandomModel(spec: RandomModelSpec): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix: "fusedge-model-" });
  const r = rng(spec.seed ?? 1);
  const normal = () => {
    const u = Math.max(r(), 1e-12);
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * r());
  };
  const vocab = 4096;
  const d = spec.hidden;
  const hd = d / spec.heads;
  const rand = (shape: number[], scale: number): Tensor => {
    const n = shape.reduce((a, b) => a * b, 1);
    return tensor(shape, Float32Array.from({ length: n }, () => normal() * scale));
  };
  const gain = () => tensor([d], Float32Array.from({ length: d }, () => 1 + 0.2 * normal()));
  const w: Record<string, Tensor> = {};
  w["model.embed_tokens.weight"] = rand([vocab, d], 1);
  spec.layers.forEach((l, i) => {
    const p = `model.layers.${i}`;
    const kvHeads = l.kvGroup ? spec.heads / l.kvGroup : spec.kvHeads;
    if (l.attention !== "none") w[`${p}.input_layernorm.weight`] = gain();
    if (l.attention === "full") {
      w[`${p}.self_attn.q_proj.weight`] = rand([spec.heads * hd, d], 1 / Math.sqrt(d));
      w[`${p}.self_attn.k_proj.weight`] = rand([kvHeads * hd, d], 1 / Math.sqrt(d));
      w[`${p}.self_attn.v_proj.weight`] = rand([kvHeads * hd, d], 1 / Math.sqrt(d));
      w[`${p}.self_attn.o_proj.weight`] = rand([d, spec.heads * hd], 0.5 / Math.sqrt(d));
    } else if (l.attention === "linear") {
      w[`${p}.self_attn.linear_attn.weight`] = rand([d, d], 0.5 / Math.sqrt(d));
    }
    if (l.ffn !== "none") w[`${p}.post_attention_layernorm.weight`] = gain();
    const n = l.intermediate ?? spec.intermediate;
    if (l.ffn === "swiglu") {
      w[`${p}.mlp.gate_proj.weight`] = rand([n, d], 1 / Math.sqrt(d));
      w[`${p}.mlp.up_proj.weight`] = rand([n, d], 1 / Math.sqrt(d));
      w[`${p}.mlp.down_proj.weight`] = rand([d, n], 0.5 / Math.sqrt(n));
    } else if (l.ffn === "linear") {
      w[`${p}.mlp.linear_mlp.weight`] = rand([d, d], 0.5 / Math.sqrt(d));
    }
  });
  w["model.norm.weight"] = gain();
  if (spec.tie === false) w["lm_head.weight"] = rand([vocab, d], 1 / Math.sqrt(d));

  const config: Record<string, unknown> = {
    model_type: spec.modelType,
    vocab_size: vocab,
    hidden_size: d,
    intermediate_size: spec.intermediate,
    num_hidden_layers: spec.layers.length,
    num_attention_heads: spec.heads,
    num_key_value_heads: spec.kvHeads,
    max_position_embeddings: 256,
    rms_norm_eps: 1e-5,
    rope_theta: 10000,
    tie_word_embeddings: spec.tie !== false,
    bos_token_id: 0,
    eos_token_id: 0,
  };
  if (spec.modelType === "nemotron-nas") {
    config.block_configs = spec.layers.map((l) => ({
      attention: {
        no_op: l.attention === "none",
        replace_with_linear: l.attention === "linear",
        n_heads_in_group: l.attention === "full" ? (l.kvGroup ?? spec.heads / spec.kvHeads) : null,
      },
      ffn: {
        no_op: l.ffn === "none",
        replace_with_linear: l.ffn === "linear",
        intermediate_size: l.ffn === "swiglu" ? (l.intermediate ?? spec.intermediate) : null,
      },
    }));
  }
  await Deno.writeTextFile(join(dir, "config.json"), JSON.stringify(config));
  await Deno.copyFile(join(TINY_NAS, "tokenizer.json"), join(dir, "tokenizer.json"));
  const names = Object.keys(w);
  if (spec.sharded) {
    const half = Math.ceil(names.length / 2);
    const shards = [names.slice(0, half), names.slice(half)];
    const weightMap: Record<string, string> = {};
    for (const [k, shard] of shards.entries()) {
      const file = `model-0000${k + 1}-of-00002.safetensors`;
      await Deno.writeFile(
        join(dir, file),
        encodeSafetensors(Object.fromEntries(shard.map((n) => [n, w[n]])), spec.dtype),
      );
      shard.forEach((n) => (weightMap[n] = file));
    }
    await Deno.writeTextFile(
      join(dir, "model.safetensors.index.json"),
      JSON.stringify({ metadata: {}, weight_map: weightMap }),
    );
  } else {
    await Deno.writeFile(join(dir, "model.safetensors"), encodeSafetensors(w, spec.dtype));
  }
  return dir;
}

/** A small DeciLM-style model with an attention-free run, the shape fusion is for. */
export const NAS_LIKE: RandomModelSpec = {
  modelType: "nemotron-nas",
  hidden: 64,
  heads: 4,
  kvHeads: 2,
  intermediate: 48,
  layers: [
    { attention: "full", ffn: "swiglu" },
    { attention: "full", ffn: "swiglu", kvGroup: 4 },
    { attention: "none", ffn: "swiglu", intermediate: 64 },
    { attention: "none", ffn: "swiglu" },
    { attention: "none", ffn: "swiglu", intermediate: 32 },
    { attention: "linear", ffn: "swiglu" },
    { attention: "full", ffn: "linear", kvGroup: 1 },
    { attention: "full", ffn: "none" },
  ],
};

/** Writes a synthetic checkpoint (scripts/synth_checkpoint.ts) into `dir`; returns the script's summary. */
export async function synthCheckpoint(dir: string, model: string, ...args: string[]) {
  const made = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      join(ROOT, "scripts", "synth_checkpoint.ts"),
      "--model",
      model,
      "--out",
      dir,
      ...args,
    ],
    stdout: "piped",
    stderr: "null",
  }).output();
  if (made.code !== 0) throw new Error(`synth_checkpoint.ts exited ${made.code}`);
  return JSON.parse(new TextDecoder().decode(made.stdout)) as { shards: number; bytes: number };
}

/**
 * Runs `code` in a fresh Deno process (so its resident memory is its own) and parses the JSON it prints
 * last; `VmHWM`/`VmRSS` read /proc/self/status there. stderr is returned for error-message checks.
 */
export async function probe<T>(code: string): Promise<{ value: T; stderr: string }> {
  const prelude = `const status = (k) => Number(new RegExp(k + ":\\\\s+(\\\\d+)")
    .exec(Deno.readTextFileSync("/proc/self/status"))[1]) * 1024;\n`;
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["eval", "--config", join(ROOT, "deno.json"), prelude + code],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stderr = new TextDecoder().decode(out.stderr);
  if (out.code !== 0) throw new Error(`probe exited ${out.code}: ${stderr}`);
  const lines = new TextDecoder().decode(out.stdout).trim().split("\n");
  return { value: JSON.parse(lines.at(-1)!) as T, stderr };
}

/** An import specifier for a project module, for probe code. */
export const moduleUrl = (path: string) => new URL(`../${path}`, import.meta.url).href;

/** n rows of inputs in [-1, 1) and their images under a random linear map (`truth` [dOut, dIn]): an exact fit exists. */
export function exactLinearData(seed: number, n: number, dIn: number, dOut: number) {
  const random = rng(seed);
  const truth = Float64Array.from({ length: dOut * dIn }, () => random() * 2 - 1);
  const h = Float64Array.from({ length: n * dIn }, () => random() * 2 - 1);
  const y = new Float64Array(n * dOut);
  for (let r = 0; r < n; r++) {
    for (let o = 0; o < dOut; o++) {
      for (let i = 0; i < dIn; i++) y[r * dOut + o] += h[r * dIn + i] * truth[o * dIn + i];
    }
  }
  return { n, dIn, dOut, truth, h, y, random };
}

/** Runs a script of scripts/ with Deno, its exit code and output as text. */
/** Runs a script: `name` under scripts/, or a path from the repository's root (bench/studies/...). */
export async function runScript(name: string, ...args: string[]) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", join(ROOT, name.includes("/") ? name : join("scripts", name)), ...args],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = (b: Uint8Array) => new TextDecoder().decode(b);
  return { code: out.code, stdout: text(out.stdout), stderr: text(out.stderr) };
}

/** A reported figure's spread is well formed: positive, min <= median <= max; `context` names it on failure. */
export function assertSpread(s: Spread, context: unknown = s): void {
  assert.ok(s.min > 0 && s.min <= s.median && s.median <= s.max, JSON.stringify(context));
}
