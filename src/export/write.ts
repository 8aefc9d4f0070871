import { join } from "node:path";
import { InputError } from "../errors.ts";
import type { QualityReport } from "../fusion/evaluate.ts";
import type { HealReport, HealStage } from "../fusion/heal.ts";
import { type FusionPlan, planId } from "../fusion/plan.ts";
import { STORED_SIZE, type StoredType, type TensorToWrite, writeSafetensors } from "../model/safetensors.ts";
import { numel } from "../model/tensor.ts";
import type { Checkpoint } from "../model/checkpoint.ts";
import { type ModelAssets, planBlocks } from "../instance/build.ts";
import { blockConfig, type ExportLayer, exportLayers, layerTensors } from "./decilm.ts";

export type ExportDtype = "fp32" | "fp16" | "bf16";

const STORED: Record<ExportDtype, { stored: StoredType; torch: string }> = {
  fp32: { stored: "F32", torch: "float32" },
  fp16: { stored: "F16", torch: "float16" },
  bf16: { stored: "BF16", torch: "bfloat16" },
};

/** Hugging Face's default shard bound ("2GB"). */
export const MAX_SHARD_BYTES = 2e9;

/** Tokenizer files copied as they are, when the source has them. */
const TOKENIZER_FILES = [
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "tokenizer.model",
];

export interface ExportOptions {
  assets: ModelAssets;
  plan: FusionPlan;
  out: string;
  dtype: ExportDtype;
  /** Write into a directory that already has files. */
  force?: boolean;
  maxShardBytes?: number;
  /** Held-out quality of the plan against the unfused model, for the model card. */
  quality?: { unfused: QualityReport; plan: QualityReport };
}

export interface ExportSummary {
  out: string;
  plan: string;
  layers: number;
  sourceLayers: number;
  shards: string[];
  bytes: number;
}

/** The source's dtype as the export default: what its config.json says it was trained and shipped in. */
export async function sourceDtype(dir: string): Promise<ExportDtype> {
  try {
    const raw = JSON.parse(await Deno.readTextFile(join(dir, "config.json")));
    const t = raw.torch_dtype ?? raw.dtype;
    return t === "bfloat16" ? "bf16" : t === "float16" ? "fp16" : "fp32";
  } catch {
    return "fp32";
  }
}

async function prepareOut(out: string, force: boolean): Promise<void> {
  let info: Deno.FileInfo | null = null;
  try {
    info = await Deno.stat(out);
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) {
      throw new InputError(`cannot use ${out}: ${(e as Error).message}`, "out");
    }
  }
  if (info && !info.isDirectory) throw new InputError(`${out} exists and is not a directory`, "out");
  if (info && !force) {
    for await (const _ of Deno.readDir(out)) {
      throw new InputError(`${out} is not empty (give --force to write into it)`, "out");
    }
  }
  await Deno.mkdir(out, { recursive: true });
}

/** Consecutive runs of tensors, each run at most `max` bytes (a larger tensor gets a shard of its own). */
function shard(tensors: TensorToWrite[], bytesPer: number, max: number): TensorToWrite[][] {
  const shards: TensorToWrite[][] = [[]];
  let size = 0;
  for (const t of tensors) {
    const bytes = numel(t.shape) * bytesPer;
    if (size > 0 && size + bytes > max) {
      shards.push([]);
      size = 0;
    }
    shards.at(-1)!.push(t);
    size += bytes;
  }
  return shards;
}

/**
 * Writes the plan applied to the model as a Hugging Face checkpoint in the DeciLM / Nemotron-NAS
 * layout (see decilm.ts for the layer mapping): config.json with `block_configs`, sharded safetensors
 * with their index, the tokenizer files, generation_config.json and a model card.
 */
export async function exportCheckpoint(opts: ExportOptions): Promise<ExportSummary> {
  const { assets, plan, out } = opts;
  const ckpt = assets.checkpoint;
  const cfg = ckpt.config;
  await prepareOut(out, opts.force ?? false);
  const { blocks, heal } = await planBlocks(assets, plan);
  const layers = exportLayers(blocks);
  const tensors: TensorToWrite[] = [
    { name: "model.embed_tokens.weight", shape: ckpt.embed.shape, data: () => ckpt.embed.data },
    ...layers.flatMap((l, i) => layerTensors(l, `model.layers.${i}`, cfg.hidden)),
    { name: "model.norm.weight", shape: [cfg.hidden], data: () => ckpt.finalNorm },
    ...(cfg.tieEmbeddings
      ? []
      : [{ name: "lm_head.weight", shape: ckpt.lmHead.shape, data: () => ckpt.lmHead.data }]),
  ];
  const { stored, torch } = STORED[opts.dtype];
  const bytes = STORED_SIZE[stored];
  const shards = shard(tensors, bytes, opts.maxShardBytes ?? MAX_SHARD_BYTES);
  const names = shards.length === 1
    ? ["model.safetensors"]
    : shards.map((_, i) =>
      `model-${String(i + 1).padStart(5, "0")}-of-${String(shards.length).padStart(5, "0")}.safetensors`
    );
  let total = 0;
  const weightMap: Record<string, string> = {};
  for (const [i, s] of shards.entries()) {
    await writeSafetensors(join(out, names[i]), s, stored);
    for (const t of s) {
      weightMap[t.name] = names[i];
      total += numel(t.shape) * bytes;
    }
  }
  if (shards.length > 1) {
    await writeJson(join(out, "model.safetensors.index.json"), {
      metadata: { total_size: total },
      weight_map: weightMap,
    });
  }
  const raw = JSON.parse(await Deno.readTextFile(join(ckpt.dir, "config.json")));
  await writeJson(join(out, "config.json"), {
    ...raw,
    architectures: ["DeciLMForCausalLM"],
    model_type: "nemotron-nas",
    num_hidden_layers: layers.length,
    block_configs: layers.map((l) => blockConfig(l, cfg)),
    torch_dtype: torch,
  });
  for (const f of TOKENIZER_FILES) {
    try {
      await Deno.copyFile(join(ckpt.dir, f), join(out, f));
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) throw e;
    }
  }
  try {
    await Deno.copyFile(join(ckpt.dir, "generation_config.json"), join(out, "generation_config.json"));
  } catch {
    await writeJson(join(out, "generation_config.json"), {
      bos_token_id: cfg.bosTokenId,
      eos_token_id: cfg.eosTokenIds.length === 1 ? cfg.eosTokenIds[0] : cfg.eosTokenIds,
    });
  }
  await Deno.writeTextFile(join(out, "README.md"), modelCard(assets.name, plan, layers, opts, heal));
  return {
    out,
    plan: planId(plan),
    layers: layers.length,
    sourceLayers: cfg.numLayers,
    shards: names,
    bytes: total,
  };
}

async function writeJson(path: string, value: unknown): Promise<void> {
  await Deno.writeTextFile(path, JSON.stringify(value, null, 2) + "\n");
}

function describe(l: ExportLayer): string {
  if (l.parallel) {
    return `parallel blocks: ${l.parallel.map((p) => describe(p).replace(" | ", " + ")).join("; ")} |`;
  }
  const a = l.attention.kind === "full" ? "attention" : l.attention.kind === "linear" ? "linear" : "no-op";
  const f = l.ffn.kind === "swiglu"
    ? `SwiGLU ${l.ffn.block.gate.shape[0]}${
      l.ffn.block.layers.length > 1 ? ` (fused ${l.ffn.block.layers.length})` : ""
    }`
    : l.ffn.kind === "linear"
    ? "linear"
    : "no-op";
  return `${a} | ${f}`;
}

/** The model card's account of healing: what was fitted, on what, and what it did per group. */
export function healSection(heal: HealReport | undefined): string[] {
  if (!heal) return [];
  const f = (x: number) => x.toFixed(4);
  // Stages by objective: a block group has no input maps, only its members' down projections.
  const stage = (g: HealReport["groups"][number], objective: HealStage["objective"]) => {
    const s = g.stages.find((x) => x.objective === objective);
    return !s ? "-" : s.kept ? `ridge ${s.ridge}` : "not kept";
  };
  return [
    "## Healing",
    "",
    "Fitted without training (fusedge's `heal`): each fused FFN group's members read a ridge-fitted linear map",
    "of the group's normalised input that predicts their sequential input (folded into their gate and up rows),",
    "then the group's down projection is refitted to the sequential output, each token's error scaled by the",
    "inverse RMS of that output; a block group gets the second stage for its members' down projections.",
    `${heal.calibration_tokens} calibration tokens; each stage and ridge chosen by the loss on`,
    `${heal.heldout_tokens} held-out tokens and kept only where it lowers it. Every FFN group is still one wide`,
    "FFN.",
    "",
    "| group | input maps | down projection | held-out loss unhealed | healed |",
    "| --- | --- | --- | --- | --- |",
    ...heal.groups.map((g) =>
      `| ${g.kind === "block" ? "blk " : ""}${g.layers[0]}-${g.layers.at(-1)} | ${
        stage(g, "member_input")
      } | ${stage(g, "down_projection")} | ${f(g.heldout_loss.unhealed)} | ${f(g.heldout_loss.healed)} |`
    ),
    "",
  ];
}

function modelCard(
  source: string,
  plan: FusionPlan,
  layers: ExportLayer[],
  opts: ExportOptions,
  heal?: HealReport,
): string {
  const q = opts.quality;
  const row = (name: string, r: QualityReport) =>
    `| ${name} | ${r.loss.toFixed(4)} | ${r.ppl.toFixed(3)} | ${r.kl?.toFixed(4) ?? "-"} | ${
      r.top1_agreement?.toFixed(3) ?? "-"
    } |`;
  return [
    "---",
    "library_name: transformers",
    "tags: [nemotron-nas, ffn-fusion, fusedge]",
    "---",
    "",
    `# ${source}, FFN-fused (${planId(plan)})`,
    "",
    `Written by fusedge from \`${source}\` on ${
      new Date().toISOString().slice(0, 10)
    }, weights in ${opts.dtype}.`,
    "FFN Fusion (Bercovich et al., 2025): each run of FFNs with no attention between them is one wide FFN",
    "computing `x + sum_i FFN_i(norm_i(x))` (each member's RMSNorm gain folded into its gate and up rows),",
    "instead of the members one after another.",
    "",
    "The layout is DeciLM / Nemotron-NAS (`model_type: nemotron-nas`, `block_configs`): vLLM's `nemotron_nas`,",
    "TensorRT-LLM and transformers with NVIDIA's DeciLM modelling code load it; fusedge serves it as it is.",
    "Fused widths are padded with zeros to a multiple of 256, which changes no output.",
    "",
    "## Plan",
    "",
    "```json",
    JSON.stringify(plan),
    "```",
    "",
    "## Layers",
    "",
    "| layer | source layers | attention | FFN |",
    "| --- | --- | --- | --- |",
    ...layers.map((l, i) => `| ${i} | ${l.source.join(", ")} | ${describe(l)} |`),
    "",
    ...healSection(heal),
    "## Quality",
    "",
    ...(q
      ? [
        `Held-out text, ${q.plan.tokens} tokens; KL and top-1 agreement against the unfused model.`,
        "",
        "| model | loss | perplexity | KL | top-1 |",
        "| --- | --- | --- | --- | --- |",
        row("unfused", q.unfused),
        row(planId(plan), q.plan),
      ]
      : ["Not measured at export (`main.ts export --eval-tokens N` measures it)."]),
    "",
  ].join("\n");
}

/** What the export worker is given (GET /export). */
export interface ExportJob {
  /** The served checkpoint (file-backed). */
  checkpoint: Checkpoint;
  modelDir: string;
  plan: FusionPlan;
  dtype: ExportDtype;
  /** An empty directory the checkpoint is written into. */
  out: string;
  calibrationText?: string;
}
