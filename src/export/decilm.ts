import type { Block, FfnBlock } from "../model/blocks.ts";
import type { AttentionWeights, LinearWeights } from "../model/checkpoint.ts";
import { ffnMultToIntermediate, type ModelConfig } from "../model/config.ts";
import type { TensorToWrite } from "../model/safetensors.ts";
import { InputError } from "../errors.ts";

/** One decoder layer as DeciLM / Nemotron-NAS stores it: an attention (or none) then an FFN (or none). */
export interface ExportLayer {
  attention:
    | { kind: "none" }
    | { kind: "full"; kvHeads: number; weights: AttentionWeights }
    | { kind: "linear"; weights: LinearWeights };
  ffn: { kind: "none" } | { kind: "swiglu"; block: FfnBlock } | { kind: "linear"; weights: LinearWeights };
  /** The source layers this layer computes (a fused FFN: all its members). */
  source: number[];
  /** Whole blocks computed from the layer's input (a block group): NVIDIA's `parallel_blocks`. */
  parallel?: ExportLayer[];
}

const NO_OP_LAYER = { attention: { kind: "none" }, ffn: { kind: "none" } } as const;

/**
 * A plan's block list as DeciLM layers: each attention opens a layer and the FFN after it closes it;
 * an FFN with no attention before it (a fused group whose first attention is gone, or any FFN after
 * a removed attention) is a layer whose attention is a no-op. A fused group is therefore one layer,
 * with the first member's attention when it has one.
 */
export function exportLayers(blocks: Block[]): ExportLayer[] {
  const out: ExportLayer[] = [];
  let open: ExportLayer | null = null;
  const close = () => {
    if (open) out.push(open);
    open = null;
  };
  for (const b of blocks) {
    if (b.kind === "attention" || (b.kind === "linear" && b.part === "attention")) {
      close();
      open = {
        attention: b.kind === "attention"
          ? { kind: "full", kvHeads: b.kvHeads, weights: b.weights }
          : { kind: "linear", weights: b.weights },
        ffn: { kind: "none" },
        source: [b.layer],
      };
    } else if (b.kind === "ffn" || b.kind === "linear") {
      const ffn: ExportLayer["ffn"] = b.kind === "ffn"
        ? { kind: "swiglu", block: b }
        : { kind: "linear", weights: b.weights };
      const layers = b.kind === "ffn" ? b.layers : [b.layer];
      const current = open as ExportLayer | null;
      if (current && current.ffn.kind === "none") {
        current.ffn = ffn;
        current.source = [...new Set([...current.source, ...layers])];
        close();
      } else {
        close();
        out.push({ attention: { kind: "none" }, ffn, source: layers });
      }
    } else if (b.kind === "parallel_blocks") {
      // A block group (or a linear attention beside a fused FFN): one layer of parallel blocks, each
      // member one block of its own.
      close();
      const parallel = b.members.map((m) => {
        const layers = exportLayers(m);
        if (layers.length !== 1) {
          throw new InputError(`a parallel member of ${layers.length} layers has no DeciLM form`, "plan");
        }
        return layers[0];
      });
      out.push({ ...NO_OP_LAYER, parallel, source: [...new Set(parallel.flatMap((p) => p.source))] });
    } else {
      throw new InputError("parallel FFNs are exported fused: apply the plan in its fused form", "plan");
    }
  }
  close();
  return out;
}

/** Loaders that derive the width from `ffn_mult` round it up to a multiple of 256; so do we, with zeros. */
export const paddedWidth = (n: number) => Math.ceil(n / 256) * 256;

/** The `ffn_mult` that DeciLM's rule (2/3 of ffn_mult x hidden, rounded up to 256) maps to `width`. */
export function ffnMultFor(width: number, hidden: number): number {
  const exact = (3 * width) / (2 * hidden);
  const rounded = Number(exact.toFixed(6));
  return ffnMultToIntermediate(rounded, hidden) === width ? rounded : exact;
}

/** NVIDIA's `block_configs` entry for a layer (its parallel blocks' entries nested in `parallel_blocks`). */
export function blockConfig(layer: ExportLayer, cfg: ModelConfig): Record<string, unknown> {
  if (layer.parallel) {
    return {
      ...blockConfig({ ...NO_OP_LAYER, source: layer.source }, cfg),
      parallel_blocks: layer.parallel.map((p) => blockConfig(p, cfg)),
    };
  }
  const a = layer.attention;
  const f = layer.ffn;
  const width = f.kind === "swiglu" ? paddedWidth(f.block.gate.shape[0]) : null;
  return {
    attention: {
      no_op: a.kind === "none",
      replace_with_linear: a.kind === "linear",
      n_heads_in_group: a.kind === "full" ? cfg.numHeads / a.kvHeads : null,
    },
    ffn: {
      no_op: f.kind === "none",
      replace_with_linear: f.kind === "linear",
      ffn_mult: width === null ? null : ffnMultFor(width, cfg.hidden),
      intermediate_size: width,
    },
  };
}

/** [rows, cols] with zero rows appended up to `rows2`. */
function padRows(data: Float32Array, cols: number, rows2: number): Float32Array {
  const out = new Float32Array(rows2 * cols);
  out.set(data);
  return out;
}

/** [rows, cols] with zero columns appended up to `cols2`. */
function padCols(data: Float32Array, rows: number, cols: number, cols2: number): Float32Array {
  if (cols === cols2) return data;
  const out = new Float32Array(rows * cols2);
  for (let r = 0; r < rows; r++) out.set(data.subarray(r * cols, (r + 1) * cols), r * cols2);
  return out;
}

/**
 * The tensors of one layer under DeciLM's names. A fused FFN's RMSNorm gains are already folded into
 * its gate and up rows, so its norm is all ones; its width is padded with zero gate/up rows and zero
 * down columns, which contribute exactly nothing (silu(0) x 0 = 0).
 */
export function layerTensors(layer: ExportLayer, p: string, hidden: number): TensorToWrite[] {
  if (layer.parallel) {
    return layer.parallel.flatMap((sub, j) => layerTensors(sub, `${p}.parallel_blocks.${j}`, hidden));
  }
  const out: TensorToWrite[] = [];
  const a = layer.attention;
  if (a.kind === "full") {
    const w = a.weights;
    out.push(
      { name: `${p}.input_layernorm.weight`, shape: [hidden], data: () => w.norm },
      { name: `${p}.self_attn.q_proj.weight`, shape: w.q.shape, data: () => w.q.data },
      { name: `${p}.self_attn.k_proj.weight`, shape: w.k.shape, data: () => w.k.data },
      { name: `${p}.self_attn.v_proj.weight`, shape: w.v.shape, data: () => w.v.data },
      { name: `${p}.self_attn.o_proj.weight`, shape: w.o.shape, data: () => w.o.data },
    );
  } else if (a.kind === "linear") {
    out.push(
      { name: `${p}.input_layernorm.weight`, shape: [hidden], data: () => a.weights.norm },
      {
        name: `${p}.self_attn.linear_attn.weight`,
        shape: [hidden, hidden],
        data: () => a.weights.weight.data,
      },
    );
  }
  const f = layer.ffn;
  if (f.kind === "swiglu") {
    const b = f.block;
    const n = b.gate.shape[0];
    const width = paddedWidth(n);
    out.push(
      {
        name: `${p}.post_attention_layernorm.weight`,
        shape: [hidden],
        data: () => b.norm ?? new Float32Array(hidden).fill(1),
      },
      {
        name: `${p}.mlp.gate_proj.weight`,
        shape: [width, hidden],
        data: () => padRows(b.gate.data, hidden, width),
      },
      {
        name: `${p}.mlp.up_proj.weight`,
        shape: [width, hidden],
        data: () => padRows(b.up.data, hidden, width),
      },
      {
        name: `${p}.mlp.down_proj.weight`,
        shape: [hidden, width],
        data: () => padCols(b.down.data, hidden, n, width),
      },
    );
  } else if (f.kind === "linear") {
    out.push(
      { name: `${p}.post_attention_layernorm.weight`, shape: [hidden], data: () => f.weights.norm },
      { name: `${p}.mlp.linear_mlp.weight`, shape: [hidden, hidden], data: () => f.weights.weight.data },
    );
  }
  return out;
}
