import { z } from "zod";
import { BadCheckpointError, formatZodError } from "../errors.ts";

const positiveInt = z.number().int().positive();

const ropeSchema = z.object({
  rope_type: z.string().optional(),
  type: z.string().optional(),
  rope_theta: z.number().positive().optional(),
  factor: z.number().positive().optional(),
  low_freq_factor: z.number().positive().optional(),
  high_freq_factor: z.number().positive().optional(),
  original_max_position_embeddings: positiveInt.optional(),
}).loose();

const deciSubblocks = {
  attention: z.object({
    no_op: z.boolean().default(false),
    replace_with_linear: z.boolean().default(false),
    n_heads_in_group: positiveInt.nullable().optional(),
    num_key_value_heads: positiveInt.nullable().optional(),
  }).loose().nullable().optional(),
  ffn: z.object({
    no_op: z.boolean().default(false),
    replace_with_linear: z.boolean().default(false),
    ffn_mult: z.number().positive().nullable().optional(),
    intermediate_size: positiveInt.nullable().optional(),
  }).loose().nullable().optional(),
};

/**
 * NVIDIA's block config: an attention and an FFN, or `parallel_blocks`, whole blocks computed from the
 * same input (their weights under `model.layers.{i}.parallel_blocks.{j}`).
 */
const deciBlockSchema = z.object({
  ...deciSubblocks,
  parallel_blocks: z.array(z.object(deciSubblocks).loose()).min(1).nullable().optional(),
}).loose();

const tokenId = z.number().int().nonnegative();

/** The subset of a Hugging Face `config.json` this engine reads; unknown keys are ignored. */
export const hfConfigSchema = z.object({
  model_type: z.string(),
  vocab_size: positiveInt,
  hidden_size: positiveInt,
  intermediate_size: positiveInt.optional(),
  num_hidden_layers: positiveInt,
  num_attention_heads: positiveInt,
  num_key_value_heads: positiveInt.nullable().optional(),
  head_dim: positiveInt.nullable().optional(),
  hidden_act: z.string().default("silu"),
  max_position_embeddings: positiveInt.default(2048),
  rms_norm_eps: z.number().positive().default(1e-6),
  rope_theta: z.number().positive().optional(),
  rope_scaling: ropeSchema.nullable().optional(),
  rope_parameters: ropeSchema.nullable().optional(),
  tie_word_embeddings: z.boolean().default(false),
  attention_bias: z.boolean().default(false),
  mlp_bias: z.boolean().default(false),
  bos_token_id: z.union([tokenId, z.array(tokenId)]).nullable().optional(),
  eos_token_id: z.union([tokenId, z.array(tokenId)]).nullable().optional(),
  block_configs: z.array(deciBlockSchema).optional(),
}).loose();

export type HfConfig = z.infer<typeof hfConfigSchema>;

export type AttentionSpec =
  | { kind: "full"; kvHeads: number }
  | { kind: "linear" }
  | { kind: "none" };

export type FfnSpec =
  | { kind: "swiglu"; intermediate: number }
  | { kind: "linear" }
  | { kind: "none" };

export interface LayerSpec {
  attention: AttentionSpec;
  ffn: FfnSpec;
  /**
   * Blocks computed in parallel from the layer's input, `x + sum_j (block_j(x) - x)` (the layer's own
   * attention and FFN are then no-ops).
   */
  parallel?: LayerSpec[];
}

export interface RopeSpec {
  theta: number;
  /** Llama 3 style frequency-dependent scaling, or plain linear position scaling. */
  scaling:
    | { kind: "none" }
    | { kind: "linear"; factor: number }
    | {
      kind: "llama3";
      factor: number;
      lowFreqFactor: number;
      highFreqFactor: number;
      originalMaxPositions: number;
    };
}

/** The normalised architecture every later stage works from, whatever config dialect it came from. */
export interface ModelConfig {
  modelType: "llama" | "nemotron-nas";
  vocabSize: number;
  hidden: number;
  numHeads: number;
  headDim: number;
  numLayers: number;
  maxPositions: number;
  rmsEps: number;
  rope: RopeSpec;
  tieEmbeddings: boolean;
  bosTokenId: number | null;
  eosTokenIds: number[];
  layers: LayerSpec[];
}

const LLAMA_TYPES = new Set(["llama"]);
const DECI_TYPES = new Set(["nemotron-nas", "deci", "decilm"]);

function fail(message: string): never {
  throw new BadCheckpointError(`config.json: ${message}`);
}

function ropeFrom(cfg: HfConfig): RopeSpec {
  const params = cfg.rope_parameters ?? cfg.rope_scaling ?? null;
  const theta = params?.rope_theta ?? cfg.rope_theta ?? 10000;
  const type = params?.rope_type ?? params?.type ?? "default";
  switch (type) {
    case "default":
      return { theta, scaling: { kind: "none" } };
    case "linear":
      return {
        theta,
        scaling: { kind: "linear", factor: params?.factor ?? fail("linear rope scaling needs factor") },
      };
    case "llama3":
      return {
        theta,
        scaling: {
          kind: "llama3",
          factor: params?.factor ?? fail("llama3 rope scaling needs factor"),
          lowFreqFactor: params?.low_freq_factor ?? 1,
          highFreqFactor: params?.high_freq_factor ?? 4,
          originalMaxPositions: params?.original_max_position_embeddings ?? 8192,
        },
      };
    default:
      return fail(`rope type "${type}" is not supported (supported: default, linear, llama3)`);
  }
}

/** DeciLM's rule: 2/3 of ffn_mult * hidden, rounded up to a multiple of 256. */
export function ffnMultToIntermediate(ffnMult: number, hidden: number): number {
  const size = Math.floor((2 * ffnMult * hidden) / 3);
  return size % 256 === 0 ? size : size + 256 - (size % 256);
}

function llamaLayers(cfg: HfConfig, kvHeads: number): LayerSpec[] {
  const intermediate = cfg.intermediate_size ?? fail("intermediate_size is required for model_type llama");
  return Array.from({ length: cfg.num_hidden_layers }, () => ({
    attention: { kind: "full", kvHeads } as const,
    ffn: { kind: "swiglu", intermediate } as const,
  }));
}

function deciLayers(cfg: HfConfig): LayerSpec[] {
  const blocks = cfg.block_configs ?? fail(`model_type ${cfg.model_type} needs block_configs`);
  if (blocks.length !== cfg.num_hidden_layers) {
    fail(`block_configs has ${blocks.length} entries but num_hidden_layers is ${cfg.num_hidden_layers}`);
  }
  return blocks.map((block, i) => {
    const where = `block_configs[${i}]`;
    if (!block.parallel_blocks) return deciLayer(block, where, cfg);
    if ((block.attention && !block.attention.no_op) || (block.ffn && !block.ffn.no_op)) {
      fail(
        `${where} has parallel_blocks and an attention or FFN of its own: give them as one more parallel block`,
      );
    }
    return {
      attention: { kind: "none" },
      ffn: { kind: "none" },
      parallel: block.parallel_blocks.map((b, j) => deciLayer(b, `${where}.parallel_blocks[${j}]`, cfg)),
    };
  });
}

/** One attention + FFN block of `block_configs` (older configs: n_heads_in_group, ffn_mult; newer: num_key_value_heads, intermediate_size). */
function deciLayer(
  block: { attention?: DeciAttention | null; ffn?: DeciFfn | null },
  where: string,
  cfg: HfConfig,
): LayerSpec {
  const a = block.attention ?? fail(`${where}.attention is required`);
  const f = block.ffn ?? fail(`${where}.ffn is required`);
  let attention: AttentionSpec;
  if (a.no_op) attention = { kind: "none" };
  else if (a.replace_with_linear) attention = { kind: "linear" };
  else {
    const kvHeads = a.num_key_value_heads ??
      cfg.num_attention_heads /
        (a.n_heads_in_group ?? fail(`${where}.attention.n_heads_in_group is required`));
    if (!Number.isInteger(kvHeads) || cfg.num_attention_heads % kvHeads !== 0) {
      fail(`${where}.attention: ${kvHeads} key/value heads do not divide ${cfg.num_attention_heads} heads`);
    }
    attention = { kind: "full", kvHeads };
  }
  let ffn: FfnSpec;
  if (f.no_op) ffn = { kind: "none" };
  else if (f.replace_with_linear) ffn = { kind: "linear" };
  else if (f.intermediate_size) ffn = { kind: "swiglu", intermediate: f.intermediate_size };
  else if (f.ffn_mult) {
    ffn = { kind: "swiglu", intermediate: ffnMultToIntermediate(f.ffn_mult, cfg.hidden_size) };
  } else fail(`${where}.ffn needs intermediate_size or ffn_mult`);
  return { attention, ffn };
}

type DeciAttention = NonNullable<z.infer<typeof deciSubblocks.attention>>;
type DeciFfn = NonNullable<z.infer<typeof deciSubblocks.ffn>>;

function asList(v: number | number[] | null | undefined): number[] {
  if (v === null || v === undefined) return [];
  return Array.isArray(v) ? v : [v];
}

/** Validates a parsed config.json and turns it into a ModelConfig, or throws an BadCheckpointError naming the field. */
export function parseConfig(raw: unknown): ModelConfig {
  const parsed = hfConfigSchema.safeParse(raw);
  if (!parsed.success) fail(formatZodError(parsed.error));
  const cfg = parsed.data;
  const type = cfg.model_type;
  if (!LLAMA_TYPES.has(type) && !DECI_TYPES.has(type)) {
    fail(`unknown model_type "${type}" (supported: llama, nemotron-nas/deci)`);
  }
  if (cfg.hidden_act !== "silu") fail(`hidden_act "${cfg.hidden_act}" is not supported (only silu)`);
  if (cfg.attention_bias) fail("attention_bias: true is not supported");
  if (cfg.mlp_bias) fail("mlp_bias: true is not supported");
  const headDim = cfg.head_dim ?? cfg.hidden_size / cfg.num_attention_heads;
  // onnxruntime's GroupQueryAttention, which the graph's attention is, takes head sizes in multiples
  // of 16 (every Llama-family release uses 64 or 128).
  if (!Number.isInteger(headDim) || headDim % 16 !== 0) {
    fail(`head_dim ${headDim} is not supported: the attention operator needs a multiple of 16`);
  }
  const kvHeads = cfg.num_key_value_heads ?? cfg.num_attention_heads;
  if (cfg.num_attention_heads % kvHeads !== 0) {
    fail(`num_key_value_heads ${kvHeads} does not divide num_attention_heads ${cfg.num_attention_heads}`);
  }
  const layers = LLAMA_TYPES.has(type) ? llamaLayers(cfg, kvHeads) : deciLayers(cfg);
  const bos = asList(cfg.bos_token_id);
  return {
    modelType: LLAMA_TYPES.has(type) ? "llama" : "nemotron-nas",
    vocabSize: cfg.vocab_size,
    hidden: cfg.hidden_size,
    numHeads: cfg.num_attention_heads,
    headDim,
    numLayers: cfg.num_hidden_layers,
    maxPositions: cfg.max_position_embeddings,
    rmsEps: cfg.rms_norm_eps,
    rope: ropeFrom(cfg),
    tieEmbeddings: cfg.tie_word_embeddings,
    bosTokenId: bos.length ? bos[0] : null,
    eosTokenIds: asList(cfg.eos_token_id),
    layers,
  };
}
