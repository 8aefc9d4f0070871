import assert from "node:assert/strict";
import { planId, validatePlan } from "../src/fusion/plan.ts";
import { formatName, type GraphOptions } from "../src/onnx/format.ts";
import { buildInstance, type Engine, loadAssets } from "../src/instance/build.ts";
import { generate, type GenerateParams, type GenerationSummary } from "../src/decode/generate.ts";
import type { TokenLogprob } from "../src/sampling/logprobs.ts";
import type { Device } from "../src/ort/ort.ts";
import { DEFAULT_SAMPLING } from "../src/sampling/sampling.ts";
import { EVAL_TEXT, golden, HAS_NATIVE, relL2, TINY_NAS } from "./helpers.ts";
import { UNFUSED } from "../src/fusion/plan.ts";
import type { ModelSession } from "../src/ort/session.ts";

export const FP32_INT4: GraphOptions = { dtype: "fp32", quantize: "int4" };
export const FP32_INT8: GraphOptions = { dtype: "fp32", quantize: "int8" };

/** One sequence through an engine to its end: the summary, and every token's logprobs when asked for. */
export async function runToEnd(engine: Engine, prompt: number[], params: Partial<GenerateParams>) {
  const it = generate({
    engine,
    promptIds: prompt,
    params: { ...DEFAULT_SAMPLING, maxTokens: 24, stop: [], ...params },
  });
  const logprobs: TokenLogprob[] = [];
  let r = await it.next();
  while (!r.done) {
    logprobs.push(...r.value.logprobs ?? []);
    r = await it.next();
  }
  return { summary: r.value as GenerationSummary, logprobs };
}

/**
 * Every plan form (fused groups, removed and linear attention, block groups) in each weight format,
 * built for `device` and for WASM: the logits within 1e-3 (relative L2) and the greedy ids the same.
 */
export async function planFormsMatchWasm(device: Device, formats: GraphOptions[]): Promise<void> {
  const assets = await loadAssets(TINY_NAS, {}, EVAL_TEXT);
  const prompt = (await golden(TINY_NAS)).cases[1].input_ids;
  const plans = [
    { ffn_groups: [[3, 4, 5], [6, 7, 8]] },
    { version: 2, attention: { remove: [9] }, ffn_groups: [[8, 9]] },
    { version: 2, attention: { linear: [2] }, ffn_groups: [[2, 3, 4]] },
    { version: 2, block_groups: [[9, 10]] },
  ];
  for (const raw of plans) {
    for (const format of formats) {
      const plan = validatePlan(raw, assets.checkpoint.config);
      const other = await buildInstance(assets, plan, device, format);
      const wasm = await buildInstance(assets, plan, "wasm", format);
      try {
        const name = `${planId(plan)} ${formatName(format)} on ${device}`;
        const [a, b] = [await other.logitsOf(prompt), await wasm.logitsOf(prompt)];
        assert.ok(relL2(a, b) < 1e-3, `${name}: logits rel err ${relL2(a, b)}`);
        const params = { ignoreEos: true, maxTokens: 6 };
        const [x, y] = [
          await runToEnd(other.engine, prompt, params),
          await runToEnd(wasm.engine, prompt, params),
        ];
        assert.deepEqual(x.summary.ids, y.summary.ids, name);
      } finally {
        await other.release();
        await wasm.release();
      }
    }
  }
}

/**
 * A test on each host device (WASM; native onnxruntime where it loads) over unfused tiny-nas's
 * instance, with its session and the held-out text's ids; the instance is released however it ends.
 */
export function onHostDevices(
  name: (device: "wasm" | "cpu") => string,
  fn: (ctx: {
    assets: Awaited<ReturnType<typeof loadAssets>>;
    inst: Awaited<ReturnType<typeof buildInstance>>;
    s: ModelSession;
    ids: number[];
  }) => Promise<void>,
): void {
  for (const device of ["wasm", "cpu"] as const) {
    Deno.test({
      name: name(device),
      ignore: device === "cpu" && !HAS_NATIVE,
      sanitizeResources: false,
      sanitizeOps: false,
      fn: async () => {
        const assets = await loadAssets(TINY_NAS);
        const inst = await buildInstance(assets, UNFUSED, device);
        const ids = assets.tokenizer.encode(await Deno.readTextFile(EVAL_TEXT));
        try {
          await fn({ assets, inst, s: inst.session!, ids });
        } finally {
          await inst.release();
        }
      },
    });
  }
}
