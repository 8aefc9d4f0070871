import { calibrationFlag, healedIf, healFlag } from "./load.ts";
import { z } from "zod";
import { evaluateQuality } from "../fusion/evaluate.ts";
import { textWindows } from "../fusion/calibration.ts";
import { loadPlanFile, UNFUSED } from "../fusion/plan.ts";
import { exportCheckpoint, MAX_SHARD_BYTES, sourceDtype } from "../export/write.ts";
import { buildInstance, loadAssets, type ModelAssets } from "../instance/build.ts";
import type { FusionPlan } from "../fusion/plan.ts";
import { type DeviceRequest, resolveDevice } from "../ort/ort.ts";
import { DEFAULT_CALIBRATION_TEXT, DEFAULT_MODEL_DIR } from "./defaults.ts";
import { defineCommand, deviceFlag } from "./flags.ts";
import { progressPrinter } from "./progress.ts";

/** Held-out loss of the plan and of the unfused model through serving sessions, for the model card. */
async function measure(
  assets: ModelAssets,
  plan: FusionPlan,
  flags: { text: string; eval_tokens: number; device: DeviceRequest },
) {
  const device = await resolveDevice(flags.device);
  const window = Math.min(256, assets.checkpoint.config.maxPositions);
  const sequences = await textWindows(flags.text, assets.tokenizer, {
    skip: 0,
    max: flags.eval_tokens,
    window,
  });
  const base = await buildInstance(assets, UNFUSED, device);
  const fused = await buildInstance(assets, plan, device);
  try {
    const score = (i: typeof base) => (ids: number[]) => i.logitsOf(ids);
    const unfused = await evaluateQuality(sequences, assets.checkpoint.config.vocabSize, score(base));
    const planned = await evaluateQuality(
      sequences,
      assets.checkpoint.config.vocabSize,
      score(fused),
      score(base),
      progressPrinter("export: quality windows"),
    );
    return { unfused, plan: planned };
  } finally {
    await base.release();
    await fused.release();
  }
}

export const exportCommand = defineCommand({
  name: "export",
  summary: "write the model under a plan as a DeciLM / Nemotron-NAS checkpoint (JSON summary on stdout)",
  schema: z.strictObject({
    model: z.string().default(DEFAULT_MODEL_DIR).describe(
      "checkpoint directory (default: embedded tiny-nas)",
    ),
    plan: z.string().describe("fusion plan file (JSON)"),
    out: z.string().describe("directory to write (refused when not empty, unless --force)"),
    dtype: z.enum(["auto", "fp32", "fp16", "bf16"]).default("auto").describe(
      "weight type of the safetensors (auto: the source's torch_dtype)",
    ),
    force: z.boolean().default(false).describe("write into a directory that already has files"),
    max_shard_mb: z.number().gt(0).max(1e6).default(MAX_SHARD_BYTES / 1e6).describe("largest shard"),
    calibration: calibrationFlag,
    heal: healFlag,
    eval_tokens: z.number().int().min(0).max(1e6).default(0).describe(
      "held-out tokens the model card's quality table is measured on (0: none)",
    ),
    text: z.string().default(DEFAULT_CALIBRATION_TEXT).describe(
      "held-out text for --eval-tokens (skip the calibration's first 512 tokens with care)",
    ),
    device: deviceFlag,
  }),
  async run(flags) {
    const assets = await loadAssets(flags.model, {}, flags.calibration);
    const plan = healedIf(await loadPlanFile(flags.plan, assets.checkpoint.config), flags.heal);
    const quality = flags.eval_tokens > 0 ? await measure(assets, plan, flags) : undefined;
    const summary = await exportCheckpoint({
      assets,
      plan,
      out: flags.out,
      dtype: flags.dtype === "auto" ? await sourceDtype(flags.model) : flags.dtype,
      force: flags.force,
      maxShardBytes: flags.max_shard_mb * 1e6,
      quality,
    });
    console.log(JSON.stringify(summary));
  },
});
