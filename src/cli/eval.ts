import { z } from "zod";
import { evaluateQuality, type Scorer } from "../fusion/evaluate.ts";
import { UNFUSED } from "../fusion/plan.ts";
import { buildInstance, type ModelInstance } from "../runtime/engine.ts";
import { disposeCache } from "../runtime/session.ts";
import { parseFlags, validateFlags } from "./args.ts";
import { textFlags } from "./analyze.ts";
import { loadModel, modelFlags } from "./load.ts";
import { textWindows } from "../fusion/calibration.ts";
import { progressPrinter } from "./progress.ts";

const schema = z.strictObject({ ...modelFlags, ...textFlags });

function scorer(inst: ModelInstance): Scorer {
  return async (ids) => {
    const { logits, cache } = await inst.session.step(ids, inst.session.emptyCache());
    disposeCache(cache);
    return logits;
  };
}

/**
 * `eval`: loss and perplexity of the model (under --plan, if given) on a text, through the same
 * onnxruntime session that serves it; with a plan, KL and top-1 agreement against the unfused model.
 */
export async function evalCommand(argv: string[]): Promise<void> {
  const flags = validateFlags(schema, parseFlags(argv));
  const { assets, instance } = await loadModel(flags);
  const cfg = assets.checkpoint.config;
  const window = Math.min(flags.window ?? 256, cfg.maxPositions);
  const sequences = await textWindows(flags.text, assets.tokenizer, {
    skip: flags["skip-tokens"],
    max: flags["max-tokens"],
    window,
  });
  const fused = flags.plan !== undefined;
  const baseline = fused ? await buildInstance(assets, UNFUSED, instance.device) : null;
  const report = await evaluateQuality(
    sequences,
    cfg.vocabSize,
    scorer(instance),
    baseline ? scorer(baseline) : undefined,
    progressPrinter("eval: windows"),
  );
  await instance.session.release();
  await baseline?.session.release();
  console.log(
    JSON.stringify({ model: assets.name, plan: instance.planId, device: instance.device, ...report }),
  );
}
