import { z } from "zod";
import { useThreads } from "../ort/threads.ts";
import { DEFAULT_HEAL, type FusionPlan, loadPlanFile, UNFUSED } from "../fusion/plan.ts";
import { quantizesWide } from "../onnx/quantize.ts";
import { ConvertHelpers } from "../onnx/convert_pool.ts";
import { buildInstance, loadAssets, type ModelAssets, type ModelInstance } from "../instance/build.ts";
import type { FloatType } from "../onnx/format.ts";
import type { Quantization } from "../onnx/format.ts";
import { loadConfig } from "../model/checkpoint.ts";
import { checkModelFits } from "../ort/memory.ts";
import { decodeAdvice } from "../ort/decode_estimate.ts";
import { adapterMaxBuffer, type DeviceRequest, resolveDevice, resolveGraphOptions } from "../ort/ort.ts";
import { DEFAULT_CALIBRATION_TEXT, DEFAULT_MODEL_DIR } from "./defaults.ts";
import { deviceFlag, dtypeFlag, quantizeFlag } from "./flags.ts";

/** Text the plan's fits are made on: linear attentions, and healing (`--heal`). */
export const calibrationFlag = z.string().default(DEFAULT_CALIBRATION_TEXT).describe(
  "text a version 2 plan's linear attentions (its first 512 tokens) and healing are fitted on",
);

export const healFlag = z.boolean().default(false).describe(
  "heal the plan's fused FFN and block groups on --calibration text (the plan's own heal settings, else 16384 tokens, 4096 held out)",
);

/** The plan as `--heal` asks for it: healed with its own settings, or the defaults when it names none. */
export function healedIf<P extends FusionPlan>(plan: P, heal: boolean | undefined): P {
  return heal && !plan.heal ? { ...plan, heal: DEFAULT_HEAL } : plan;
}

/** The flags that say which model to run and how: shared by logits, generate, eval and serve. */
export const modelFlags = {
  model: z.string().default(DEFAULT_MODEL_DIR).describe("checkpoint directory (default: embedded tiny-nas)"),
  plan: z.string().optional().describe("fusion plan file (JSON)"),
  device: deviceFlag,
  dtype: dtypeFlag,
  quantize: quantizeFlag,
  max_context: z.number().int().min(2).optional().describe("serve a shorter context than the model's"),
  threads: z.number().int().min(1).max(256).optional().describe(
    "threads per model session (WASM: default 1, the serving thread keeps a core; cpu: default all cores)",
  ),
  calibration: calibrationFlag,
  heal: healFlag,
};

export interface LoadedModel {
  assets: ModelAssets;
  instance: ModelInstance;
}

export async function loadModel(
  flags: {
    model: string;
    plan?: string;
    device: DeviceRequest;
    dtype: FloatType | "auto";
    quantize: Quantization;
    max_context?: number;
    calibration?: string;
    threads?: number;
    heal?: boolean;
  },
): Promise<LoadedModel> {
  const device = await resolveDevice(flags.device);
  await useThreads(device, flags.threads);
  const graph = await resolveGraphOptions(flags.dtype, flags.quantize, device);
  const maxContext = flags.max_context;
  // Refused before a single weight is read when it cannot fit.
  const config = await loadConfig(flags.model, { maxContext });
  checkModelFits(config, graph, device, { sequences: 1, maxBufferBytes: await adapterMaxBuffer(device) });
  const advice = decodeAdvice(config, graph, device);
  if (advice) console.error(advice);
  const assets = await loadAssets(flags.model, { maxContext }, flags.calibration);
  const plan = healedIf(
    flags.plan ? await loadPlanFile(flags.plan, assets.checkpoint.config) : UNFUSED,
    flags.heal,
  );
  // A command has nothing else to run while it builds: every core quantizes.
  const cores = navigator.hardwareConcurrency || 1;
  const helpers = cores > 1 && quantizesWide(config, graph) ? await ConvertHelpers.start(cores) : null;
  try {
    const convert = helpers?.buffers;
    return {
      assets,
      instance: await buildInstance(assets, plan, device, graph, undefined, undefined, { convert }),
    };
  } finally {
    helpers?.close();
  }
}
