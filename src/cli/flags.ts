import { parseArgs } from "node:util";
import { z } from "zod";
import { formatZodError, InputError } from "../errors.ts";

/**
 * Commands take their flags from a zod object schema, the same schema the HTTP body of that request
 * is checked with: a key `max_tokens` is the flag `--max-tokens`. Parsing, coercion from strings,
 * error messages and the usage text are all derived from the schema, so they cannot drift apart.
 */
export interface Command<S extends z.ZodObject = z.ZodObject> {
  name: string;
  summary: string;
  schema: S;
  /** Flags read from the environment when not given, e.g. `{ admin_token: "FUSEDGE_ADMIN_TOKEN" }`. */
  env?: Partial<Record<keyof z.infer<S> & string, string>>;
  run(flags: z.infer<S>): Promise<void>;
}

export function defineCommand<S extends z.ZodObject>(c: Command<S>): Command {
  return c as unknown as Command;
}

type Kind = "boolean" | "number" | "numbers" | "strings" | "string";

interface FieldInfo {
  kind: Kind;
  required: boolean;
  fallback?: unknown;
  choices?: string[];
  description?: string;
}

// deno-lint-ignore no-explicit-any
type AnyDef = any;

/** What a flag takes, read off its schema through the wrappers (optional, default, transforms). */
function fieldInfo(field: z.ZodType): FieldInfo {
  let cur = field as AnyDef;
  let required = true;
  let fallback: unknown;
  let description: string | undefined = cur.description;
  for (;;) {
    const def = cur._zod.def;
    if (def.type === "default") {
      required = false;
      fallback = def.defaultValue;
      cur = def.innerType;
    } else if (def.type === "optional") {
      required = false;
      cur = def.innerType;
    } else if (def.type === "pipe") cur = def.in;
    else break;
    description ??= cur.description;
  }
  const def = cur._zod.def;
  const info = (kind: Kind, choices?: string[]): FieldInfo => ({
    kind,
    required,
    fallback,
    choices,
    description,
  });
  switch (def.type) {
    case "boolean":
      return info("boolean");
    case "number":
      return info("number");
    case "enum":
      return info("string", Object.values(def.entries as Record<string, string>));
    case "array":
      return info(def.element._zod.def.type === "number" ? "numbers" : "strings");
    case "union":
      return info(def.options.some((o: AnyDef) => o._zod.def.type === "array") ? "strings" : "string");
    default:
      return info("string");
  }
}

const flagName = (key: string) => `--${key.replaceAll("_", "-")}`;

function coerce(kind: Kind, value: string | string[] | boolean): unknown {
  if (kind === "number" && typeof value === "string" && value.trim() !== "") {
    const n = Number(value);
    return Number.isNaN(n) ? value : n;
  }
  if (kind === "numbers" && typeof value === "string") {
    return value.split(",").map((v) => (v.trim() === "" || Number.isNaN(Number(v)) ? v : Number(v)));
  }
  return value;
}

/** argv -> the schema's typed value; every failure is an InputError that names the flag. */
export function parseCommandFlags<S extends z.ZodObject>(
  command: Command<S>,
  argv: string[],
  env: (name: string) => string | undefined = (n) => Deno.env.get(n),
): z.infer<S> {
  const shape = command.schema.shape as Record<string, z.ZodType>;
  const infos = Object.fromEntries(Object.entries(shape).map(([k, f]) => [k, fieldInfo(f)]));
  const options: Record<string, { type: "string" | "boolean"; multiple?: boolean }> = {};
  for (const [key, info] of Object.entries(infos)) {
    options[key.replaceAll("_", "-")] = {
      type: info.kind === "boolean" ? "boolean" : "string",
      ...(info.kind === "strings" ? { multiple: true } : {}),
    };
  }
  let values: Record<string, string | string[] | boolean | undefined>;
  try {
    const parsed = parseArgs({ args: argv, options, strict: true, allowPositionals: true });
    if (parsed.positionals.length) throw new InputError(`unexpected argument "${parsed.positionals[0]}"`);
    values = parsed.values as typeof values;
  } catch (e) {
    if (e instanceof InputError) throw e;
    throw new InputError((e as Error).message.replace(/\. To specify a positional.*$/s, ""));
  }
  const raw: Record<string, unknown> = {};
  for (const [key, info] of Object.entries(infos)) {
    const value = values[key.replaceAll("_", "-")];
    if (value !== undefined) raw[key] = coerce(info.kind, value);
    else {
      const variable = (command.env as Record<string, string> | undefined)?.[key];
      const fromEnv = variable ? env(variable) : undefined;
      if (fromEnv !== undefined && fromEnv !== "") raw[key] = coerce(info.kind, fromEnv);
    }
  }
  const parsed = command.schema.safeParse(raw);
  if (!parsed.success) {
    throw new InputError(formatZodError(parsed.error, (path) => flagName(String(path[0]))));
  }
  return parsed.data as z.infer<S>;
}

function flagUsage(key: string, info: FieldInfo): string {
  const name = flagName(key);
  const value = info.kind === "boolean"
    ? ""
    : info.choices
    ? ` ${info.choices.join("|")}`
    : info.kind === "number"
    ? " N"
    : info.kind === "numbers"
    ? " N,N,..."
    : ` ${key.toUpperCase()}`;
  const repeat = info.kind === "strings" ? "..." : "";
  const fallback = Array.isArray(info.fallback) ? info.fallback.join(",") : info.fallback;
  const shown = fallback !== undefined && fallback !== "" && typeof fallback !== "object" &&
      !String(fallback).startsWith("/")
    ? ` (default ${fallback})`
    : "";
  const flag = `${name}${value}${repeat}`;
  const text = `${info.required ? flag : `[${flag}]`}`;
  return info.description ? `${text.padEnd(34)} ${info.description}${shown}` : `${text}${shown}`;
}

/** One command's usage: its summary and one line per flag, from the schema. */
export function commandUsage(command: Command): string {
  const shape = command.schema.shape as Record<string, z.ZodType>;
  const lines = Object.entries(shape).map(([k, f]) => `    ${flagUsage(k, fieldInfo(f))}`);
  const env = Object.entries(command.env ?? {}).map(([k, v]) => `${flagName(k)} also from $${v}`);
  return [
    `  ${command.name}: ${command.summary}`,
    ...lines,
    ...(env.length ? [`    (${env.join("; ")})`] : []),
  ]
    .join("\n");
}

/** Numbers and integers as flag values: zod checks the ranges, the messages name the flag. */
export const deviceFlag = z.enum(["auto", "webgpu", "wasm", "cpu"]).default("auto").describe(
  "where the model runs (auto: WebGPU on a GPU, else WASM; cpu: native onnxruntime, fetched on first use)",
);

export const dtypeFlag = z.enum(["auto", "fp32", "fp16"]).default("auto")
  .describe("float type of weights and activations (auto: fp16 on WebGPU with shader-f16, else fp32)");

export const quantizeFlag = z.enum(["none", "int8", "int4"]).default("none")
  .describe(
    "weight quantization of every MatMul weight (MatMulNBits, blocks of 32; on WASM integer GEMMs, int4 held in int8)",
  );
