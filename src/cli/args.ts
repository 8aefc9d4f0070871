import { parseArgs } from "node:util";
import { z } from "zod";
import { InputError } from "../errors.ts";

/** Flags every command understands; each command's zod schema picks and validates its own. */
const FLAG_SPEC = {
  model: { type: "string" },
  plan: { type: "string" },
  device: { type: "string" },
  prompt: { type: "string" },
  text: { type: "string" },
  "max-tokens": { type: "string" },
  temperature: { type: "string" },
  "top-k": { type: "string" },
  "top-p": { type: "string" },
  "repetition-penalty": { type: "string" },
  seed: { type: "string" },
  stop: { type: "string", multiple: true },
  "skip-tokens": { type: "string" },
  window: { type: "string" },
  "max-width": { type: "string" },
  threshold: { type: "string" },
  svg: { type: "string" },
  preset: { type: "string" },
  k: { type: "string" },
  tokens: { type: "string" },
  dtype: { type: "string" },
  "decode-tokens": { type: "string" },
  "max-active": { type: "string" },
  "max-queue": { type: "string" },
  "request-timeout": { type: "string" },
  "max-tokens-cap": { type: "string" },
  "max-body-bytes": { type: "string" },
  "admin-token": { type: "string" },
  "api-key": { type: "string" },
  port: { type: "string" },
  host: { type: "string" },
  json: { type: "boolean" },
  help: { type: "boolean", short: "h" },
} as const;

export type RawFlags = Record<string, string | string[] | boolean | undefined>;

export function parseFlags(argv: string[]): RawFlags {
  try {
    const { values, positionals } = parseArgs({
      args: argv,
      options: FLAG_SPEC,
      strict: true,
      allowPositionals: true,
    });
    if (positionals.length) throw new InputError(`unexpected argument "${positionals[0]}"`);
    return values as RawFlags;
  } catch (e) {
    if (e instanceof InputError) throw e;
    throw new InputError((e as Error).message);
  }
}

/** Numbers arrive as strings; coerce and range-check them with the flag's name in the message. */
export const num = () => z.coerce.number().refine(Number.isFinite, "must be a number");
export const int = () => z.coerce.number().int("must be an integer");
export const deviceFlag = z.enum(["auto", "webgpu", "wasm"]).default("auto");

export function validateFlags<S extends z.ZodType>(schema: S, flags: RawFlags): z.infer<S> {
  const parsed = schema.safeParse(flags);
  if (!parsed.success) {
    throw new InputError(
      parsed.error.issues
        .map((i) =>
          i.code === "unrecognized_keys"
            ? `${i.keys.map((k) => `--${k}`).join(", ")} is not a flag of this command`
            : `--${i.path.map(String).join(".")}: ${i.message}`
        )
        .join("; "),
    );
  }
  return parsed.data;
}
