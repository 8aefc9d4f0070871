import assert from "node:assert/strict";
import { UNFUSED } from "../src/fusion/plan.ts";
import { buildInstance, loadAssets, type ModelAssets, type ModelInstance } from "../src/runtime/engine.ts";
import { generate, type GenerateParams, type GenerationSummary } from "../src/runtime/generate.ts";
import { DEFAULT_SAMPLING } from "../src/runtime/sampling.ts";
import { golden, HAS_WEBGPU, TINY_NAS } from "./helpers.ts";

/** Every GPU readback in this process (onnxruntime's included) goes through mapAsync. */
let readbacks = 0;
if (HAS_WEBGPU) {
  const original = GPUBuffer.prototype.mapAsync;
  GPUBuffer.prototype.mapAsync = function (...args: Parameters<GPUBuffer["mapAsync"]>) {
    readbacks++;
    return original.apply(this, args);
  };
}

async function run(
  assets: ModelAssets,
  inst: ModelInstance,
  prompt: number[],
  params: Partial<GenerateParams>,
  readbackBatch?: number,
) {
  const before = readbacks;
  const chunks: string[] = [];
  const it = generate({
    session: inst.session,
    tokenizer: assets.tokenizer,
    promptIds: prompt,
    params: { ...DEFAULT_SAMPLING, maxTokens: 24, stop: [], ...params },
    eosTokenIds: assets.checkpoint.config.eosTokenIds,
    maxPositions: assets.checkpoint.config.maxPositions,
    readbackBatch,
  });
  let r = await it.next();
  while (!r.done) {
    chunks.push(r.value.text);
    r = await it.next();
  }
  return { summary: r.value as GenerationSummary, chunks, readbacks: readbacks - before };
}

Deno.test({
  name: "GPU-resident decode: golden greedy ids with one readback per 8 tokens instead of one per token",
  ignore: !HAS_WEBGPU,
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const assets = await loadAssets(TINY_NAS);
    const inst = await buildInstance(assets, UNFUSED, "webgpu");
    const c = (await golden(TINY_NAS)).cases[0];
    const gpu = await run(assets, inst, c.input_ids, { ignoreEos: true });
    assert.deepEqual(gpu.summary.ids, c.greedy_ids);
    assert.ok(gpu.readbacks <= 24 / 8 + 1, `${gpu.readbacks} readbacks for 24 tokens`);
    const host = await run(assets, inst, c.input_ids, { ignoreEos: true }, 0);
    assert.deepEqual(host.summary.ids, c.greedy_ids);
    assert.ok(host.readbacks >= 24, `host sampling reads logits back every step (${host.readbacks})`);
    assert.equal(gpu.summary.text, host.summary.text);

    // A stop sequence inside a batch ends the run there, like on the host path.
    const stop = await run(assets, inst, c.input_ids, { stop: ["\n"] });
    const hostStop = await run(assets, inst, c.input_ids, { stop: ["\n"] }, 0);
    assert.equal(stop.summary.text, hostStop.summary.text);
    assert.equal(stop.summary.finishReason, "stop");

    // Temperature sampling on the GPU (Gumbel-max): reproducible per seed, varied across seeds.
    const sample = (seed: number) =>
      run(assets, inst, c.input_ids, { temperature: 1.5, seed, ignoreEos: true, maxTokens: 6 });
    const a = await sample(11);
    const b = await sample(11);
    assert.deepEqual(a.summary.ids, b.summary.ids);
    const others = await Promise.all([12, 13, 14].map(sample));
    assert.ok(
      others.some((o) => o.summary.ids.join() !== a.summary.ids.join()),
      "different seeds sample differently",
    );
    await inst.session.release();
  },
});
