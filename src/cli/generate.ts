import { z } from "zod";
import { generationFields, toGenerateParams } from "../requests/generation.ts";
import { checkPromptFits } from "../decode/context.ts";
import { generate } from "../decode/generate.ts";
import { defineCommand } from "./flags.ts";
import { loadModel, modelFlags } from "./load.ts";

export const generateCommand = defineCommand({
  name: "generate",
  summary: "streams the continuation of --prompt to stdout (greedy by default), a JSON summary to stderr",
  schema: z.strictObject({
    ...modelFlags,
    prompt: z.string().min(1, "must not be empty").describe("the prompt"),
    ...generationFields(undefined, 0, 64),
  }),
  async run(flags) {
    const params = toGenerateParams(flags);
    const { assets, instance } = await loadModel(flags);
    const cfg = assets.checkpoint.config;
    const promptIds = assets.tokenizer.encode(flags.prompt);
    checkPromptFits(promptIds.length, cfg.maxPositions);
    const out = new TextEncoder();
    const t0 = performance.now();
    const it = generate({ engine: instance.engine, promptIds, params });
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
    await instance.release();
  },
});
