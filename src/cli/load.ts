import { z } from "zod";
import { loadPlanFile, UNFUSED } from "../fusion/plan.ts";
import { buildInstance, loadAssets, type ModelAssets, type ModelInstance } from "../runtime/engine.ts";
import { resolveDevice } from "../runtime/ort.ts";
import { DEFAULT_MODEL_DIR } from "./defaults.ts";
import { deviceFlag } from "./flags.ts";

/** The flags that say which model to run and how: shared by logits, generate, eval and serve. */
export const modelFlags = {
  model: z.string().default(DEFAULT_MODEL_DIR).describe("checkpoint directory (default: embedded tiny-nas)"),
  plan: z.string().optional().describe("fusion plan file (JSON)"),
  device: deviceFlag,
};

export interface LoadedModel {
  assets: ModelAssets;
  instance: ModelInstance;
}

export async function loadModel(
  flags: { model: string; plan?: string; device: "auto" | "webgpu" | "wasm" },
): Promise<LoadedModel> {
  const device = await resolveDevice(flags.device);
  const assets = await loadAssets(flags.model);
  const plan = flags.plan ? await loadPlanFile(flags.plan, assets.checkpoint.config) : UNFUSED;
  return { assets, instance: await buildInstance(assets, plan, device) };
}
