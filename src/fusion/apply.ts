import { type Block, type FfnBlock, layerOf } from "../model/blocks.ts";
import { concatColumns, lazyTensor, type Tensor, tensor } from "../model/tensor.ts";
import type { LinearWeights } from "../model/checkpoint.ts";
import { blockGroups, type FusionPlan, linearAttention, removedAttention } from "./plan.ts";

/** Rows of [n, d] scaled column-wise by the RMSNorm gain: norm(x)*g @ W^T == norm(x) @ (W*g)^T. */
function foldGain(w: Tensor, gain: Float32Array | null): Float32Array {
  const [rows, cols] = w.shape;
  const out = Float32Array.from(w.data);
  if (!gain) return out;
  for (let r = 0; r < rows; r++) {
    const base = r * cols;
    for (let c = 0; c < cols; c++) out[base + c] *= gain[c];
  }
  return out;
}

/**
 * (W diag(g)) M: a member that reads M norm(x) instead of norm(x), folded into its rows, so the wide
 * FFN stays one GEMM. Float64 accumulation; the cost is rows x hidden^2 once per fit.
 */
function foldInputMap(w: Float32Array, rows: number, hidden: number, map: Float64Array): Float32Array {
  const out = new Float32Array(rows * hidden);
  const acc = new Float64Array(hidden);
  for (let r = 0; r < rows; r++) {
    acc.fill(0);
    const base = r * hidden;
    for (let k = 0; k < hidden; k++) {
      const wk = w[base + k];
      if (wk === 0) continue;
      const mk = k * hidden;
      for (let c = 0; c < hidden; c++) acc[c] += wk * map[mk + c];
    }
    out.set(acc, base);
  }
  return out;
}

/** Per member layer, the map M [hidden, hidden] of its input: it reads M norm(x) (see fusion/heal.ts). */
export type InputMaps = Map<number, Float64Array>;

function stack(members: FfnBlock[], hidden: number, total: number, maps: InputMaps) {
  const gate = new Float32Array(total * hidden);
  const up = new Float32Array(total * hidden);
  let offset = 0;
  for (const m of members) {
    const n = m.gate.shape[0];
    const map = maps.get(m.layers[0]);
    const rows = (w: Tensor) => {
      const folded = foldGain(w, m.norm);
      return map ? foldInputMap(folded, n, hidden, map) : folded;
    };
    gate.set(rows(m.gate), offset * hidden);
    up.set(rows(m.up), offset * hidden);
    offset += n;
  }
  return { gate, up, down: concatColumns(members.map((m) => m.down.data), hidden) };
}

/**
 * `x + sum_j FFN_j(norm_j(x))` as ONE wide FFN: gate/up rows of every member stacked along the
 * intermediate axis with that member's RMSNorm gain folded in, down columns stacked along the same
 * axis, and a shared unit-gain RMS normalisation. Exact: the wide SwiGLU's intermediate units are
 * the members' units side by side, and down sums their contributions. The stacking happens on first
 * read of a weight, so a plan swap that finds a group's converted weights cached never redoes it.
 */
export function fuseFfns(members: FfnBlock[], heal?: FusionHeal): FfnBlock {
  const hidden = members[0].gate.shape[1];
  const total = members.reduce((sum, m) => sum + m.gate.shape[0], 0);
  const maps = heal?.maps ?? new Map();
  const layers = members.flatMap((m) => m.layers);
  const down = heal?.downs?.get(groupKey(layers));
  const healed = down !== undefined || members.some((m) => maps.has(m.layers[0]));
  let weights: ReturnType<typeof stack> | null = null;
  const fused = () => (weights ??= stack(members, hidden, total, maps));
  return {
    kind: "ffn",
    layers,
    norm: null,
    gate: lazyTensor([total, hidden], () => fused().gate),
    up: lazyTensor([total, hidden], () => fused().up),
    down: lazyTensor([hidden, total], () => down ?? fused().down),
    ...(healed ? { variant: heal!.variant } : {}),
  };
}

/**
 * What healing fitted (fusion/heal.ts): input maps of members, refitted down projections of fused
 * groups (by groupKey, [hidden, width]) and of block groups' FFNs (by layer), and the name of the fit
 * (see FfnBlock.variant).
 */
export interface FusionHeal {
  maps: InputMaps;
  downs?: Map<string, Float32Array>;
  blockDowns?: Map<number, Float32Array>;
  variant: string;
}

/** A fused group's key among healed down projections. */
export const groupKey = (layers: number[]): string => layers.join("_");

/**
 * `fused`: one wide FFN per group (what we serve). `parallel`: the same parallel semantics with each
 * member computed separately, the reference the fused form must equal.
 */
export type FusionForm = "fused" | "parallel";

/**
 * Applies a plan to the unfused block list: removed attentions are dropped, linear ones replaced by
 * their fitted maps (`fits`, from fitLinearAttention), each block group's layers become one
 * `parallel_blocks`, and each FFN group's blocks their fused block. The plan must already be checked
 * against the model (checkPlan): an FFN group is then free of full attention after its first layer.
 */
export function applyPlan(
  blocks: Block[],
  plan: FusionPlan,
  form: FusionForm = "fused",
  fits: Map<number, LinearWeights> = new Map(),
  heal?: FusionHeal,
): Block[] {
  const removed = new Set(removedAttention(plan));
  const linear = new Set(linearAttention(plan));
  const changed = blocks.flatMap((b): Block[] => {
    if (b.kind !== "attention") return [b];
    if (removed.has(b.layer)) return [];
    if (!linear.has(b.layer)) return [b];
    const weights = fits.get(b.layer);
    if (!weights) throw new Error(`no fitted linear map for the attention of layer ${b.layer}`);
    return [{ kind: "linear", layer: b.layer, part: "attention", weights }];
  });
  return fuseFfnGroups(parallelizeBlocks(changed, blockGroups(plan), heal), plan.ffn_groups, form, heal);
}

/** Collects the blocks of each group's layers, in order, into one `parallel_blocks` at the group's end. */
function parallelizeBlocks(blocks: Block[], groups: number[][], heal?: FusionHeal): Block[] {
  if (groups.length === 0) return blocks;
  // A healed block group's FFNs carry their refitted down projections.
  const healed = (b: Block): Block => {
    const down = b.kind === "ffn" ? heal?.blockDowns?.get(b.layers[0]) : undefined;
    return down && b.kind === "ffn" ? { ...b, down: tensor(b.down.shape, down), variant: heal!.variant } : b;
  };
  const groupOf = new Map<number, number[]>();
  for (const g of groups) for (const l of g) groupOf.set(l, g);
  const out: Block[] = [];
  let members = new Map<number, Block[]>();
  blocks.forEach((b, i) => {
    const layer = layerOf(b);
    const group = layer === undefined ? undefined : groupOf.get(layer);
    if (!group) return out.push(b);
    members.set(layer!, [...(members.get(layer!) ?? []), healed(b)]);
    const next = blocks[i + 1];
    const nextLayer = next ? layerOf(next) : undefined;
    if (layer === group.at(-1) && nextLayer !== layer) {
      out.push({ kind: "parallel_blocks", members: group.map((l) => members.get(l) ?? []) });
      members = new Map();
    }
  });
  return out;
}

/**
 * Each group's FFNs become one block; a linear attention inside a group (after its first layer) is
 * computed from the group's input too, beside the FFNs, so the group stays one parallel step.
 */
function fuseFfnGroups(blocks: Block[], groups: number[][], form: FusionForm, heal?: FusionHeal): Block[] {
  const groupOf = new Map<number, number>();
  groups.forEach((g, gi) => g.forEach((layer) => groupOf.set(layer, gi)));
  const out: Block[] = [];
  const pending = new Map<number, { ffns: FfnBlock[]; linear: Block[] }>();
  for (const b of blocks) {
    const layer = layerOf(b);
    const gi = layer === undefined ? undefined : groupOf.get(layer);
    const inner = b.kind === "linear" && b.part === "attention" && gi !== undefined &&
      groups[gi][0] !== layer;
    if (!inner && (b.kind !== "ffn" || gi === undefined)) {
      out.push(b);
      continue;
    }
    const members = pending.get(gi!) ?? { ffns: [], linear: [] };
    pending.set(gi!, members);
    if (inner) {
      members.linear.push(b);
      continue;
    }
    members.ffns.push(b as FfnBlock);
    if (members.ffns.length === groups[gi!].length) {
      const ffn: Block = form === "fused"
        ? fuseFfns(members.ffns, heal)
        : { kind: "parallel_ffn", members: members.ffns };
      out.push(
        members.linear.length
          ? { kind: "parallel_blocks", members: [[ffn], ...members.linear.map((l) => [l])] }
          : ffn,
      );
    }
  }
  return out;
}
