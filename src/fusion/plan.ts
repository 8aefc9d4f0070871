import { z } from "zod";
import { formatZodError, InvalidPlanError } from "../errors.ts";
import type { ModelConfig } from "../model/config.ts";

/** More layers than any checkpoint has: bounds what a plan body can make us allocate or check. */
const MAX_LAYERS = 1024;

const layer = z.number().int().nonnegative().max(MAX_LAYERS);
const groups = z.array(z.array(layer).min(2, "a group needs at least two layers").max(MAX_LAYERS)).max(
  MAX_LAYERS,
);

/**
 * Gradient-free healing of the plan's fused FFN groups (fusion/heal.ts): fitted on `calibration_tokens`
 * of the calibration text after `skip_tokens`, the ridge strength chosen on the `heldout_tokens` after
 * those. The defaults are the smallest measured to heal most plans of the quality table (docs/fusion.md): with
 * 4096 and 1024, the noise guard kept no stage of five plans of eight, with 16384 and 4096 of one.
 */
export const healSettings = z.strictObject({
  calibration_tokens: z.number().int().min(64).max(1 << 20).default(16384),
  skip_tokens: z.number().int().min(0).max(1e9).default(0),
  heldout_tokens: z.number().int().min(64).max(1 << 20).default(4096),
});

export type HealSettings = z.infer<typeof healSettings>;

/** `--heal` with a plan that names no settings of its own. */
export const DEFAULT_HEAL: HealSettings = healSettings.parse({});

/** Version 1: FFN groups alone. Strict, so that a misspelt key fails loudly. */
const planV1 = z.strictObject({
  version: z.literal(1).default(1),
  ffn_groups: groups,
  heal: healSettings.optional(),
});

/**
 * Version 2 adds the transformations that make a plain Llama fusable: attention sublayers removed
 * (DeciLM `no_op`: the KV cache goes with them) or replaced by one linear map of their normalised
 * input fitted to reproduce them (DeciLM `replace_with_linear`), and whole blocks computed in parallel
 * from the same input, `x + sum_b (block_b(x) - x)`, each block keeping its own KV cache.
 */
const planV2 = z.strictObject({
  version: z.literal(2),
  attention: z.strictObject({
    remove: z.array(layer).max(MAX_LAYERS).default([]),
    linear: z.array(layer).max(MAX_LAYERS).default([]),
  }).default({ remove: [], linear: [] }),
  ffn_groups: groups.default([]),
  block_groups: groups.default([]),
  heal: healSettings.optional(),
});

/** A plan as the runtime takes it: version 1 plans simply have no attention changes or block groups. */
export type FusionPlan = z.infer<typeof planV1> | z.infer<typeof planV2>;

export const UNFUSED: FusionPlan = { version: 1, ffn_groups: [] };

/** The layers whose attention the plan removes. */
export const removedAttention = (
  plan: FusionPlan,
): number[] => (plan.version === 2 ? plan.attention.remove : []);

/** The layers whose attention the plan replaces by a fitted linear map. */
export const linearAttention = (
  plan: FusionPlan,
): number[] => (plan.version === 2 ? plan.attention.linear : []);

/** The plan's groups of whole blocks computed in parallel. */
export const blockGroups = (plan: FusionPlan): number[][] => (plan.version === 2 ? plan.block_groups : []);

const span = (g: number[]) => `${g[0]}-${g[g.length - 1]}`;

/** Healing changes only groups' weights (FFN and block groups): a plan with none has nothing to heal. */
export const healable = (plan: FusionPlan): boolean => plan.ffn_groups.length + blockGroups(plan).length > 0;

/** A stable, human-readable name: "unfused", "ffn[3-5,6-8]", "-attn[4,6]+lin[5]+ffn[3-6]+blk[9-10]". */
export function planId(plan: FusionPlan): string {
  const parts: string[] = [];
  const list = (ls: number[]) => [...ls].sort((a, b) => a - b).join(",");
  const removed = removedAttention(plan);
  if (removed.length) parts.push(`-attn[${list(removed)}]`);
  const linear = linearAttention(plan);
  if (linear.length) parts.push(`lin[${list(linear)}]`);
  if (plan.ffn_groups.length) parts.push(`ffn[${plan.ffn_groups.map(span).join(",")}]`);
  const blocks = blockGroups(plan);
  if (blocks.length) parts.push(`blk[${blocks.map(span).join(",")}]`);
  if (plan.heal && healable(plan)) {
    const h = plan.heal;
    const at = h.skip_tokens ? `@${h.skip_tokens}` : "";
    const held = h.heldout_tokens === DEFAULT_HEAL.heldout_tokens ? "" : `/${h.heldout_tokens}`;
    parts.push(`heal(${h.calibration_tokens}${at}${held})`);
  }
  return parts.length ? parts.join("+") : "unfused";
}

/**
 * Parses a plan's JSON against the schema of its version alone (no model needed); a file without a
 * version is version 1, so every version 1 file stays valid.
 */
export function parsePlan(raw: unknown): FusionPlan {
  const version = typeof raw === "object" && raw !== null
    ? (raw as { version?: unknown }).version
    : undefined;
  if (version !== undefined && version !== 1 && version !== 2) {
    throw new InvalidPlanError(`invalid plan: version: expected 1 or 2, got ${JSON.stringify(version)}`);
  }
  const v2 = version === 2;
  const parsed = (v2 ? planV2 : planV1).safeParse(raw);
  if (!parsed.success) throw new InvalidPlanError(`invalid plan: ${formatZodError(parsed.error)}`);
  return parsed.data;
}

/** Parses a plan and checks it against the model. */
export function validatePlan(raw: unknown, config: ModelConfig): FusionPlan {
  return checkPlan(parsePlan(raw), config);
}

/**
 * Checks a typed plan against the model's layers; every message names the rule and the layer that
 * breaks it. FFN groups are checked against the model after the plan's attention changes: a layer
 * whose attention is removed or linear counts as attention-free, exactly as a DeciLM `no_op` layer
 * does (a group computes its linear attentions from its input too, beside its FFNs).
 */
export function checkPlan(plan: FusionPlan, config: ModelConfig): FusionPlan {
  const bad = (where: string, rule: string): never => {
    throw new InvalidPlanError(`invalid plan: ${where}: ${rule}`);
  };
  const inRange = (where: string, l: number) => {
    if (l >= config.numLayers) {
      bad(
        where,
        `layer ${l} is out of range (the model has ${config.numLayers} layers, 0..${config.numLayers - 1})`,
      );
    }
  };
  const changed = new Set<number>();
  const change = (key: "remove" | "linear", ls: number[]) =>
    ls.forEach((l, i) => {
      const where = `attention.${key}[${i}] (${l})`;
      inRange(where, l);
      if (changed.has(l)) bad(where, `layer ${l} is listed twice in attention.remove and attention.linear`);
      if (config.layers[l].attention.kind !== "full") {
        bad(
          where,
          `layer ${l} has no attention to ${key === "remove" ? "remove" : "replace"} (${
            config.layers[l].attention.kind
          })`,
        );
      }
      changed.add(l);
    });
  change("remove", removedAttention(plan));
  change("linear", linearAttention(plan));
  const owner = new Map<number, string>();
  const claim = (where: string, group: number[]) => {
    group.forEach((l, k) => {
      inRange(where, l);
      if (config.layers[l].parallel) bad(where, `layer ${l} is already a layer of parallel blocks`);
      if (k > 0 && l !== group[k - 1] + 1) {
        bad(where, `layers must be consecutive and ascending (${group[k - 1]} is followed by ${l})`);
      }
      const other = owner.get(l);
      if (other !== undefined) bad(where, `layer ${l} is already in ${other}; no layer may be in two groups`);
      owner.set(l, where);
    });
  };
  plan.ffn_groups.forEach((group, gi) => {
    const where = `ffn_groups[${gi}] [${group.join(",")}]`;
    claim(where, group);
    group.forEach((l, k) => {
      const spec = config.layers[l];
      if (spec.ffn.kind !== "swiglu") {
        bad(where, `layer ${l} has no SwiGLU FFN (${spec.ffn.kind}); only SwiGLU FFNs can be fused`);
      }
      if (k > 0 && spec.attention.kind !== "none" && !changed.has(l)) {
        bad(
          where,
          `layer ${l} has attention; only the first layer of a group may have attention (remove it with attention.remove or attention.linear)`,
        );
      }
    });
  });
  blockGroups(plan).forEach((group, gi) => {
    const where = `block_groups[${gi}] [${group.join(",")}]`;
    claim(where, group);
  });
  return plan;
}

/** A plan file's JSON, not yet validated (the server validates it once the model is loaded). */
export async function readPlanFile(path: string): Promise<unknown> {
  try {
    return JSON.parse(await Deno.readTextFile(path));
  } catch (e) {
    throw new InvalidPlanError(`cannot read plan ${path}: ${(e as Error).message}`);
  }
}

/** Reads and validates a plan file. */
export async function loadPlanFile(path: string, config: ModelConfig): Promise<FusionPlan> {
  return validatePlan(await readPlanFile(path), config);
}

/**
 * Runs of layers whose FFNs may be fused: consecutive SwiGLU layers where every layer after the
 * first has no attention (the first may have attention: it runs, then the group's FFNs). Layers in
 * `attentionGone` count as attention-free: a plan removes or linearises their attention.
 */
export function fusableRuns(config: ModelConfig, attentionGone: Set<number> = new Set()): number[][] {
  const runs: number[][] = [];
  let run: number[] = [];
  config.layers.forEach((layer, i) => {
    const free = layer.attention.kind === "none" || attentionGone.has(i);
    const continues = run.length > 0 && free && layer.ffn.kind === "swiglu";
    if (continues) run.push(i);
    else {
      if (run.length >= 2) runs.push(run);
      run = layer.ffn.kind === "swiglu" ? [i] : [];
    }
  });
  if (run.length >= 2) runs.push(run);
  return runs;
}
