import type { Block, FfnBlock } from "../model/blocks.ts";
import { lazyTensor, type Tensor } from "../model/tensor.ts";
import type { FusionPlan } from "./plan.ts";

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

function stack(members: FfnBlock[], hidden: number, total: number) {
  const gate = new Float32Array(total * hidden);
  const up = new Float32Array(total * hidden);
  const down = new Float32Array(hidden * total);
  let offset = 0;
  for (const m of members) {
    const n = m.gate.shape[0];
    gate.set(foldGain(m.gate, m.norm), offset * hidden);
    up.set(foldGain(m.up, m.norm), offset * hidden);
    const src = m.down.data;
    for (let r = 0; r < hidden; r++) down.set(src.subarray(r * n, (r + 1) * n), r * total + offset);
    offset += n;
  }
  return { gate, up, down };
}

/**
 * `x + sum_j FFN_j(norm_j(x))` as ONE wide FFN: gate/up rows of every member stacked along the
 * intermediate axis with that member's RMSNorm gain folded in, down columns stacked along the same
 * axis, and a shared unit-gain RMS normalisation. Exact: the wide SwiGLU's intermediate units are
 * the members' units side by side, and down sums their contributions. The stacking happens on first
 * read of a weight, so a plan swap that finds a group's converted weights cached never redoes it.
 */
export function fuseFfns(members: FfnBlock[]): FfnBlock {
  const hidden = members[0].gate.shape[1];
  const total = members.reduce((sum, m) => sum + m.gate.shape[0], 0);
  let weights: ReturnType<typeof stack> | null = null;
  const fused = () => (weights ??= stack(members, hidden, total));
  return {
    kind: "ffn",
    layers: members.flatMap((m) => m.layers),
    norm: null,
    gate: lazyTensor([total, hidden], () => fused().gate),
    up: lazyTensor([total, hidden], () => fused().up),
    down: lazyTensor([hidden, total], () => fused().down),
  };
}

/**
 * `fused`: one wide FFN per group (what we serve). `parallel`: the same parallel semantics with each
 * member computed separately, the reference the fused form must equal.
 */
export type FusionForm = "fused" | "parallel";

/**
 * Replaces each planned group's consecutive FFN blocks by their fused block. The plan must already
 * be validated against the model (validatePlan): groups are then attention-free after their first
 * layer, so their FFN blocks are adjacent in execution order.
 */
export function applyPlan(blocks: Block[], plan: FusionPlan, form: FusionForm = "fused"): Block[] {
  const groupOf = new Map<number, number>();
  plan.ffn_groups.forEach((g, gi) => g.forEach((layer) => groupOf.set(layer, gi)));
  const out: Block[] = [];
  const pending = new Map<number, FfnBlock[]>();
  for (const b of blocks) {
    const gi = b.kind === "ffn" && b.layers.length === 1 ? groupOf.get(b.layers[0]) : undefined;
    if (b.kind !== "ffn" || gi === undefined) {
      out.push(b);
      continue;
    }
    const members = [...(pending.get(gi) ?? []), b];
    pending.set(gi, members);
    if (members.length === plan.ffn_groups[gi].length) {
      out.push(form === "fused" ? fuseFfns(members) : { kind: "parallel_ffn", members });
    }
  }
  return out;
}
