import { z } from "zod";
import { checkPromptFits } from "../decode/context.ts";
import { defineCommand } from "./flags.ts";
import { loadModel, modelFlags } from "./load.ts";

export const logitsCommand = defineCommand({
  name: "logits",
  summary: "the next-token logits after the prompt, computed in float32: {input_ids, last_logits}",
  schema: z.strictObject({
    ...modelFlags,
    prompt: z.string().min(1, "must not be empty").describe("the prompt"),
  }),
  async run(flags) {
    const { assets, instance } = await loadModel(flags);
    const ids = assets.tokenizer.encode(flags.prompt);
    checkPromptFits(ids.length, assets.checkpoint.config.maxPositions);
    const logits = await instance.logitsOf(ids);
    const vocab = assets.checkpoint.config.vocabSize;
    const last = Array.from(logits.subarray(logits.length - vocab));
    await instance.release();
    console.log(
      JSON.stringify({ input_ids: ids, last_logits: last, plan: instance.planId, device: instance.device }),
    );
  },
});
