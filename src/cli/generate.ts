import { z } from "zod";
import { InputError } from "../errors.ts";
import { generate } from "../runtime/generate.ts";
import { generationFields, toGenerateParams } from "../runtime/params.ts";
import { parseFlags, validateFlags } from "./args.ts";
import { loadModel, modelFlags } from "./load.ts";
import { checkPromptFits } from "../runtime/context.ts";

const flagSchema = z.strictObject({
  ...modelFlags,
  prompt: z.string().min(1, "must not be empty"),
  "max-tokens": z.string().default("64"),
  temperature: z.string().default("0"),
  "top-k": z.string().optional(),
  "top-p": z.string().optional(),
  "repetition-penalty": z.string().optional(),
  seed: z.string().optional(),
  stop: z.array(z.string()).optional(),
});

const paramSchema = z.object(generationFields());

/** --flag strings -> the shared generation schema, with errors named by flag. */
function generationParams(flags: z.infer<typeof flagSchema>) {
  const n = (v: string | undefined) => (v === undefined ? undefined : Number(v));
  const parsed = paramSchema.safeParse({
    max_tokens: n(flags["max-tokens"]),
    temperature: n(flags.temperature),
    top_k: n(flags["top-k"]),
    top_p: n(flags["top-p"]),
    repetition_penalty: n(flags["repetition-penalty"]),
    seed: n(flags.seed),
    stop: flags.stop,
  });
  if (!parsed.success) {
    throw new InputError(
      parsed.error.issues.map((i) => `--${String(i.path[0]).replaceAll("_", "-")}: ${i.message}`).join("; "),
    );
  }
  return toGenerateParams(parsed.data);
}

/** `generate`: streams the continuation of --prompt to stdout; a JSON summary goes to stderr. */
export async function generateCommand(argv: string[]): Promise<void> {
  const flags = validateFlags(flagSchema, parseFlags(argv));
  const params = generationParams(flags);
  const { assets, instance } = await loadModel(flags);
  const cfg = assets.checkpoint.config;
  const promptIds = assets.tokenizer.encode(flags.prompt);
  checkPromptFits(promptIds.length, cfg.maxPositions);
  const out = new TextEncoder();
  const t0 = performance.now();
  const it = generate({
    session: instance.session,
    tokenizer: assets.tokenizer,
    promptIds,
    params,
    eosTokenIds: cfg.eosTokenIds,
    maxPositions: cfg.maxPositions,
  });
  let r = await it.next();
  while (!r.done) {
    await Deno.stdout.write(out.encode(r.value.text));
    r = await it.next();
  }
  await Deno.stdout.write(out.encode("\n"));
  const seconds = (performance.now() - t0) / 1000;
  console.error(JSON.stringify({
    finish_reason: r.value.finishReason,
    prompt_tokens: r.value.promptTokens,
    completion_tokens: r.value.completionTokens,
    tokens_per_second: r.value.completionTokens / seconds,
    plan: instance.planId,
    device: instance.device,
  }));
  await instance.session.release();
}
