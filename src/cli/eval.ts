import { z } from "zod";
import { evaluateQuality, type Scorer } from "../fusion/evaluate.ts";
import { textWindows } from "../fusion/calibration.ts";
import { UNFUSED } from "../fusion/plan.ts";
import { InputError } from "../errors.ts";
import { buildInstance, type ModelInstance } from "../instance/build.ts";
import { textFlag } from "./analyze.ts";
import { defineCommand } from "./flags.ts";
import { loadModel, modelFlags } from "./load.ts";
import { progressPrinter } from "./progress.ts";

const scorer = (inst: ModelInstance): Scorer => (ids) => inst.logitsOf(ids);

export const evalCommand = defineCommand({
  name: "eval",
  summary:
    "loss and perplexity through the serving session; with --plan, fp16 or --quantize, KL and top-1 agreement vs unfused fp32",
  schema: z.strictObject({
    ...modelFlags,
    text: textFlag,
    max_tokens: z.number().int().min(2).max(1e7).default(256).describe("tokens evaluated"),
    skip_tokens: z.number().int().min(0).max(1e9).default(0).describe(
      "tokens of the text to pass over first",
    ),
    window: z.number().int().min(2).default(256).describe("tokens per forward pass, at most the context"),
  }),
  async run(flags) {
    const { assets, instance } = await loadModel(flags);
    const cfg = assets.checkpoint.config;
    if (flags.window > cfg.maxPositions) {
      throw new InputError(
        `${flags.window} exceeds the model's context of ${cfg.maxPositions} tokens`,
        "window",
      );
    }
    const sequences = await textWindows(flags.text, assets.tokenizer, {
      skip: flags.skip_tokens,
      max: flags.max_tokens,
      window: flags.window,
    });
    // The baseline is the unfused fp32 model: KL and top-1 agreement measure what the plan and the
    // weight format together cost against the model as trained.
    const baseline = flags.plan !== undefined || instance.graph.quantize !== "none" ||
        instance.graph.dtype !== "fp32"
      ? await buildInstance(assets, UNFUSED, instance.device)
      : null;
    const report = await evaluateQuality(
      sequences,
      cfg.vocabSize,
      scorer(instance),
      baseline ? scorer(baseline) : undefined,
      progressPrinter("eval: windows"),
    );
    await instance.release();
    await baseline?.release();
    console.log(
      JSON.stringify({
        model: assets.name,
        plan: instance.planId,
        device: instance.device,
        dtype: instance.graph.dtype,
        quantize: instance.graph.quantize,
        weight_bytes: instance.weightBytes,
        ...report,
        ...(instance.heal ? { heal: instance.heal } : {}),
      }),
    );
  },
});
