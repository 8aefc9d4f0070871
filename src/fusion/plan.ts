import { z } from "zod";
import { formatZodError, InvalidPlanError } from "../errors.ts";
import type { ModelConfig } from "../model/config.ts";

/** More layers than any checkpoint has: bounds what a plan body can make us allocate or check. */
const MAX_LAYERS = 1024;

/**
 * A fusion plan file. Version 1 knows `ffn_groups` only; it is strict so that a misspelt key fails
 * loudly, and later capabilities (parallel attention blocks, attention removal) arrive as new
 * optional keys, so every version 1 file stays valid.
 */
export const planSchema = z.strictObject({
  version: z.literal(1).default(1),
  ffn_groups: z.array(
    z.array(z.number().int().nonnegative().max(MAX_LAYERS)).min(2, "a group needs at least two layers").max(
      MAX_LAYERS,
    ),
  ).max(MAX_LAYERS),
});

export type FusionPlan = z.infer<typeof planSchema>;

export const UNFUSED: FusionPlan = { version: 1, ffn_groups: [] };

/** A stable, human-readable name for a plan: "unfused" or e.g. "ffn[3-5,6-8]". */
export function planId(plan: FusionPlan): string {
  if (plan.ffn_groups.length === 0) return "unfused";
  return `ffn[${plan.ffn_groups.map((g) => `${g[0]}-${g[g.length - 1]}`).join(",")}]`;
}

/** Parses a plan's JSON against the schema alone (no model needed). */
export function parsePlan(raw: unknown): FusionPlan {
  const parsed = planSchema.safeParse(raw);
  if (!parsed.success) throw new InvalidPlanError(`invalid plan: ${formatZodError(parsed.error)}`);
  return parsed.data;
}

/** Parses a plan and checks it against the model. */
export function validatePlan(raw: unknown, config: ModelConfig): FusionPlan {
  return checkPlan(parsePlan(raw), config);
}

/** Checks a typed plan against the model's layers; every message names the group and the rule it breaks. */
export function checkPlan(plan: FusionPlan, config: ModelConfig): FusionPlan {
  const owner = new Map<number, number>();
  plan.ffn_groups.forEach((group, gi) => {
    const where = `ffn_groups[${gi}] [${group.join(",")}]`;
    const bad = (rule: string): never => {
      throw new InvalidPlanError(`invalid plan: ${where}: ${rule}`);
    };
    group.forEach((layer, k) => {
      if (layer >= config.numLayers) {
        bad(
          `layer ${layer} is out of range (the model has ${config.numLayers} layers, 0..${
            config.numLayers - 1
          })`,
        );
      }
      if (k > 0 && layer !== group[k - 1] + 1) {
        bad(`layers must be consecutive and ascending (${group[k - 1]} is followed by ${layer})`);
      }
      const other = owner.get(layer);
      if (other !== undefined) {
        bad(`layer ${layer} is already in ffn_groups[${other}]; groups must not overlap`);
      }
      owner.set(layer, gi);
      const spec = config.layers[layer];
      if (spec.ffn.kind !== "swiglu") {
        bad(`layer ${layer} has no SwiGLU FFN (${spec.ffn.kind}); only SwiGLU FFNs can be fused`);
      }
      if (k > 0 && spec.attention.kind !== "none") {
        bad(`layer ${layer} has attention; only the first layer of a group may have attention`);
      }
    });
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
 * first has no attention (the first may have attention: it runs, then the group's FFNs).
 */
export function fusableRuns(config: ModelConfig): number[][] {
  const runs: number[][] = [];
  let run: number[] = [];
  config.layers.forEach((layer, i) => {
    const continues = run.length > 0 && layer.attention.kind === "none" && layer.ffn.kind === "swiglu";
    if (continues) run.push(i);
    else {
      if (run.length >= 2) runs.push(run);
      run = layer.ffn.kind === "swiglu" ? [i] : [];
    }
  });
  if (run.length >= 2) runs.push(run);
  return runs;
}
