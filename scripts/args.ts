/**
 * Flag parsing for the measurement scripts: a bad flag or value is a message on stderr and exit 2, as on
 * the CLI, never a stack trace. (main.ts's commands take their flags from zod schemas shared with HTTP;
 * these scripts serve no requests, so node's parseArgs with these checks is enough.)
 */
import { parseArgs, type ParseArgsConfig } from "node:util";
import { type FusionPlan, validatePlan } from "../src/fusion/plan.ts";
import type { ModelConfig } from "../src/model/config.ts";

/** Exits 2 with the message. */
export function fail(message: string): never {
  console.error(message);
  Deno.exit(2);
}

/** parseArgs over Deno.args; an unknown flag or a flag missing its value exits 2 naming it. */
export function scriptFlags<O extends NonNullable<ParseArgsConfig["options"]>>(options: O) {
  try {
    return parseArgs({ args: Deno.args, options, strict: true }).values;
  } catch (e) {
    return fail((e as Error).message);
  }
}

/** A flag's value as a positive number (an integer unless `integer` is false), or exit 2 naming the flag. */
export function positive(flag: string, value: string, integer = true): number {
  const n = Number(value);
  if (!(n > 0) || (integer && !Number.isInteger(n))) {
    fail(`--${flag}: expected a positive ${integer ? "integer" : "number"}, got ${value}`);
  }
  return n;
}

/** `--group FIRST-LAST` as its layers, or exit 2 naming the flag. */
export function layerRange(value: string): number[] {
  const span = /^(\d+)-(\d+)$/.exec(value);
  if (!span || Number(span[1]) >= Number(span[2])) {
    fail(`--group: expected FIRST-LAST layers of one FFN group, got ${value}`);
  }
  const first = Number(span[1]);
  return Array.from({ length: Number(span[2]) - first + 1 }, (_, i) => first + i);
}

/** The plan fusing `layers` as one FFN group, checked against the model, or exit 2 naming `--group`. */
export function groupPlan(layers: number[], cfg: ModelConfig): FusionPlan {
  try {
    return validatePlan({ ffn_groups: [layers] }, cfg);
  } catch (e) {
    return fail(`--group: ${(e as Error).message}`);
  }
}
