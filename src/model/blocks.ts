import type {
  AttentionWeights,
  Checkpoint,
  LayerWeights,
  LinearWeights,
  SwigluWeights,
} from "./checkpoint.ts";
import type { LayerSpec } from "./config.ts";
import type { Tensor } from "./tensor.ts";

/**
 * A model as the sequence of residual updates `x += f(x)` it executes. Unfused, every layer gives
 * an attention block and an FFN block; fusion merges runs of FFN blocks into one wide FFN block.
 * `parallel_ffn` is the unfused parallel form `x + sum_j FFN_j(norm_j(x))`, member by member;
 * `parallel_blocks` computes whole layers (attention and FFN, each attention with its own KV cache)
 * from the same input, `x + sum_m (layer_m(x) - x)`, each member a sequence of blocks.
 * The graph builder and the CPU reference both execute this list, so they cannot disagree on order.
 */
export type Block =
  | { kind: "attention"; layer: number; kvHeads: number; weights: AttentionWeights }
  | { kind: "linear"; layer: number; part: "attention" | "ffn"; weights: LinearWeights }
  | FfnBlock
  | { kind: "parallel_ffn"; members: FfnBlock[] }
  | { kind: "parallel_blocks"; members: Block[][] };

export interface FfnBlock {
  kind: "ffn";
  /** The checkpoint layers whose FFNs this block computes (one when unfused). */
  layers: number[];
  /** RMSNorm gain; null when the gains were folded into `gate`/`up` (a fused block). */
  norm: Float32Array | null;
  /** [intermediate, hidden] */
  gate: Tensor;
  /** [intermediate, hidden] */
  up: Tensor;
  /** [hidden, intermediate] */
  down: Tensor;
  /**
   * Set when the weights were refitted (a healed fused group): names the fit, so converted weights of
   * the healed and the plain group never share a cache entry.
   */
  variant?: string;
}

export function isSwiglu(w: SwigluWeights | LinearWeights): w is SwigluWeights {
  return "gate" in w;
}

export function isAttention(w: AttentionWeights | LinearWeights): w is AttentionWeights {
  return "q" in w;
}

/**
 * The checkpoint's own execution order, layer by layer, attention before FFN. A layer of parallel
 * blocks (a checkpoint that was block-parallelised) is one `parallel_blocks` block; its members'
 * attentions need KV caches of their own, so they are numbered after the checkpoint's layers
 * (numLayers, numLayers + 1, ...), ids no plan can name.
 */
export function unfusedBlocks(ckpt: Checkpoint): Block[] {
  const blocks: Block[] = [];
  let extra = ckpt.config.numLayers;
  ckpt.layers.forEach((layer, i) => {
    const spec = ckpt.config.layers[i];
    if (spec.parallel) {
      blocks.push({
        kind: "parallel_blocks",
        members: spec.parallel.map((sub, j) => layerBlocks(layer.parallel![j], sub, extra++)),
      });
    } else blocks.push(...layerBlocks(layer, spec, i));
  });
  return blocks;
}

/** The blocks of one attention + FFN layer, under block id `i`. */
function layerBlocks(layer: LayerWeights, spec: LayerSpec, i: number): Block[] {
  const blocks: Block[] = [];
  if (layer.attention) {
    if (isAttention(layer.attention) && spec.attention.kind === "full") {
      blocks.push({ kind: "attention", layer: i, kvHeads: spec.attention.kvHeads, weights: layer.attention });
    } else if (!isAttention(layer.attention)) {
      blocks.push({ kind: "linear", layer: i, part: "attention", weights: layer.attention });
    }
  }
  if (layer.ffn) {
    if (isSwiglu(layer.ffn)) {
      const { norm, gate, up, down } = layer.ffn;
      blocks.push({ kind: "ffn", layers: [i], norm, gate, up, down });
    } else blocks.push({ kind: "linear", layer: i, part: "ffn", weights: layer.ffn });
  }
  return blocks;
}

/** Layers whose attention has a KV cache, in order: these name the graph's past/present tensors. */
export function cachedLayers(blocks: Block[]): { layer: number; kvHeads: number }[] {
  return blocks.flatMap((b): { layer: number; kvHeads: number }[] => {
    if (b.kind === "attention") return [{ layer: b.layer, kvHeads: b.kvHeads }];
    if (b.kind === "parallel_blocks") return b.members.flatMap(cachedLayers);
    return [];
  });
}

/** The checkpoint layer an unfused block belongs to. */
export function layerOf(b: Block): number | undefined {
  if (b.kind === "attention" || b.kind === "linear") return b.layer;
  if (b.kind === "ffn" && b.layers.length === 1) return b.layers[0];
  return undefined;
}
