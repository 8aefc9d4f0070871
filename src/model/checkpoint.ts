import { join } from "node:path";
import { z } from "zod";
import { BadCheckpointError, formatZodError } from "../errors.ts";
import { type LayerSpec, type ModelConfig, parseConfig } from "./config.ts";
import { SafetensorsFile } from "./safetensors.ts";
import type { Tensor } from "./tensor.ts";

/** Linear weights stay in the checkpoint's [out, in] layout; consumers transpose where they need to. */
export interface AttentionWeights {
  norm: Float32Array;
  q: Tensor;
  k: Tensor;
  v: Tensor;
  o: Tensor;
}

export interface SwigluWeights {
  norm: Float32Array;
  gate: Tensor;
  up: Tensor;
  down: Tensor;
}

/** DeciLM's `replace_with_linear`: a single hidden x hidden projection after the norm. */
export interface LinearWeights {
  norm: Float32Array;
  weight: Tensor;
}

export interface LayerWeights {
  attention: AttentionWeights | LinearWeights | null;
  ffn: SwigluWeights | LinearWeights | null;
  /** The weights of a layer's parallel blocks (LayerSpec.parallel), in order. */
  parallel?: LayerWeights[];
}

export interface Checkpoint {
  dir: string;
  config: ModelConfig;
  embed: Tensor;
  finalNorm: Float32Array;
  /** [vocab, hidden]; the embedding itself when the checkpoint ties them. */
  lmHead: Tensor;
  layers: LayerWeights[];
}

const indexSchema = z.object({ weight_map: z.record(z.string(), z.string()) }).loose();

async function readJson(path: string): Promise<unknown> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    throw new BadCheckpointError(`cannot read ${path}: ${(e as Error).message}`);
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new BadCheckpointError(`${path} is not valid JSON: ${(e as Error).message}`);
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch {
    return false;
  }
}

/** Opens every shard once and returns a name -> file lookup over all of them. */
async function openShards(dir: string): Promise<Map<string, SafetensorsFile>> {
  const byTensor = new Map<string, SafetensorsFile>();
  const indexPath = join(dir, "model.safetensors.index.json");
  if (await exists(indexPath)) {
    const parsed = indexSchema.safeParse(await readJson(indexPath));
    if (!parsed.success) throw new BadCheckpointError(`${indexPath}: ${formatZodError(parsed.error)}`);
    const shards = new Map<string, SafetensorsFile>();
    for (const [name, shard] of Object.entries(parsed.data.weight_map)) {
      if (shard.includes("/") || shard.includes("\\")) {
        throw new BadCheckpointError(`${indexPath}: shard "${shard}" must be a file name`);
      }
      if (!shards.has(shard)) shards.set(shard, await SafetensorsFile.open(join(dir, shard)));
      const file = shards.get(shard)!;
      if (!file.entries.has(name)) {
        throw new BadCheckpointError(
          `${indexPath}: tensor "${name}" is mapped to ${shard}, which does not contain it`,
        );
      }
      byTensor.set(name, file);
    }
    return byTensor;
  }
  const single = join(dir, "model.safetensors");
  if (!(await exists(single))) {
    throw new BadCheckpointError(`${dir}: no model.safetensors or model.safetensors.index.json`);
  }
  const file = await SafetensorsFile.open(single);
  for (const name of file.entries.keys()) byTensor.set(name, file);
  return byTensor;
}

class TensorSource {
  constructor(private readonly files: Map<string, SafetensorsFile>) {}

  has(name: string): boolean {
    return this.files.has(name);
  }

  get(name: string, shape: number[]): Tensor {
    const file = this.files.get(name);
    if (!file) throw new BadCheckpointError(`checkpoint is missing tensor "${name}"`);
    const entry = file.entries.get(name)!;
    if (entry.shape.length !== shape.length || entry.shape.some((d, i) => d !== shape[i])) {
      throw new BadCheckpointError(
        `tensor "${name}" has shape [${entry.shape}] but the config implies [${shape}]`,
      );
    }
    return file.tensor(name);
  }

  /**
   * A norm's gain, the checkpoint's own copy: a decoded tensor's data stays among the recent ones
   * until the task ends, and a build's releaseDecoded frees those, which a later build would then
   * find empty.
   */
  vector(name: string, size: number): Float32Array {
    return this.get(name, [size]).data.slice();
  }
}

function loadLayer(src: TensorSource, cfg: ModelConfig, i: number): LayerWeights {
  const spec = cfg.layers[i];
  const p = `model.layers.${i}`;
  if (spec.parallel) {
    return {
      attention: null,
      ffn: null,
      parallel: spec.parallel.map((sub, j) => loadBlock(src, cfg, sub, `${p}.parallel_blocks.${j}`)),
    };
  }
  return loadBlock(src, cfg, spec, p);
}

function loadBlock(src: TensorSource, cfg: ModelConfig, spec: LayerSpec, p: string): LayerWeights {
  const d = cfg.hidden;
  let attention: LayerWeights["attention"] = null;
  if (spec.attention.kind === "full") {
    const qDim = cfg.numHeads * cfg.headDim;
    const kvDim = spec.attention.kvHeads * cfg.headDim;
    attention = {
      norm: src.vector(`${p}.input_layernorm.weight`, d),
      q: src.get(`${p}.self_attn.q_proj.weight`, [qDim, d]),
      k: src.get(`${p}.self_attn.k_proj.weight`, [kvDim, d]),
      v: src.get(`${p}.self_attn.v_proj.weight`, [kvDim, d]),
      o: src.get(`${p}.self_attn.o_proj.weight`, [d, qDim]),
    };
  } else if (spec.attention.kind === "linear") {
    attention = {
      norm: src.vector(`${p}.input_layernorm.weight`, d),
      weight: src.get(`${p}.self_attn.linear_attn.weight`, [d, d]),
    };
  }
  let ffn: LayerWeights["ffn"] = null;
  if (spec.ffn.kind === "swiglu") {
    const n = spec.ffn.intermediate;
    ffn = {
      norm: src.vector(`${p}.post_attention_layernorm.weight`, d),
      gate: src.get(`${p}.mlp.gate_proj.weight`, [n, d]),
      up: src.get(`${p}.mlp.up_proj.weight`, [n, d]),
      down: src.get(`${p}.mlp.down_proj.weight`, [d, n]),
    };
  } else if (spec.ffn.kind === "linear") {
    ffn = {
      norm: src.vector(`${p}.post_attention_layernorm.weight`, d),
      weight: src.get(`${p}.mlp.linear_mlp.weight`, [d, d]),
    };
  }
  return { attention, ffn };
}

/** A checkpoint's display name: its directory's last path component. */
export function modelName(dir: string): string {
  return dir.replace(/\/+$/, "").split("/").pop() || dir;
}

export interface LoadOptions {
  /** Serve a shorter context than the model's own (the KV cache grows with it). */
  maxContext?: number;
}

/** Reads and checks a checkpoint's config.json alone (cheap: no weights). */
export async function loadConfig(dir: string, opts: LoadOptions = {}): Promise<ModelConfig> {
  if (!(await exists(dir))) throw new BadCheckpointError(`model directory ${dir} does not exist`);
  const config = parseConfig(await readJson(join(dir, "config.json")));
  if (opts.maxContext) config.maxPositions = Math.min(config.maxPositions, opts.maxContext);
  return config;
}

/**
 * Loads a Hugging Face checkpoint directory: config.json plus one or many safetensors shards, every
 * header checked against the config. The weight matrices are file-backed (safetensors.ts fileTensor):
 * decoded when a build reads them, never resident beside the sessions' converted copies, and posted to
 * workers as references to their bytes (attachFiles on arrival).
 */
export async function loadCheckpoint(dir: string, opts: LoadOptions = {}): Promise<Checkpoint> {
  const config = await loadConfig(dir, opts);
  const src = new TensorSource(await openShards(dir));
  const embed = src.get("model.embed_tokens.weight", [config.vocabSize, config.hidden]);
  let lmHead: Tensor;
  if (src.has("lm_head.weight")) lmHead = src.get("lm_head.weight", [config.vocabSize, config.hidden]);
  else if (config.tieEmbeddings) lmHead = embed;
  else {throw new BadCheckpointError(
      `checkpoint is missing tensor "lm_head.weight" (tie_word_embeddings is false)`,
    );}
  return {
    dir,
    config,
    embed,
    finalNorm: src.vector("model.norm.weight", config.hidden),
    lmHead,
    layers: config.layers.map((_, i) => loadLayer(src, config, i)),
  };
}
