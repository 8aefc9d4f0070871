import assert from "node:assert/strict";
import { generate } from "../src/decode/generate.ts";
import { DEFAULT_SAMPLING } from "../src/sampling/sampling.ts";
import { buildInstance, loadAssets } from "../src/instance/build.ts";
import { UNFUSED } from "../src/fusion/plan.ts";
import { type Device, probeAdapter, resolveDevice, resolveGraphOptions } from "../src/ort/ort.ts";
import { validatePlan } from "../src/fusion/plan.ts";
import { InputError } from "../src/errors.ts";
import { argmax } from "../src/numeric.ts";
import { golden, HAS_NATIVE, HAS_WEBGPU, relL2, TINY_LLAMA, TINY_NAS } from "./helpers.ts";

/** The engine against golden.json (float64 reference of the same fp16 weights), on both EPs. */
for (const dir of [TINY_NAS, TINY_LLAMA]) {
  for (const device of ["wasm", "webgpu", "cpu"] as Device[]) {
    const name = dir.split("/").pop();
    Deno.test({
      name: `golden parity: ${name} on ${device}: logits within 1e-3, greedy ids exact`,
      ignore: (device === "webgpu" && !HAS_WEBGPU) || (device === "cpu" && !HAS_NATIVE),
      sanitizeResources: false,
      sanitizeOps: false,
      fn: async () => {
        const assets = await loadAssets(dir);
        const inst = await buildInstance(assets, UNFUSED, await resolveDevice(device));
        const vocab = assets.checkpoint.config.vocabSize;
        try {
          for (const c of (await golden(dir)).cases) {
            assert.deepEqual(assets.tokenizer.encode(c.prompt), c.input_ids, "tokenizer ids");
            const logits = await inst.logitsOf(c.input_ids);
            const last = logits.subarray(logits.length - vocab);
            const first = logits.subarray(0, vocab);
            assert.ok(relL2(last, c.last_logits) < 1e-3, `last logits rel err ${relL2(last, c.last_logits)}`);
            assert.ok(
              relL2(first, c.first_logits) < 1e-3,
              `first logits rel err ${relL2(first, c.first_logits)}`,
            );
            const run = generate({
              engine: inst.engine,
              promptIds: c.input_ids,
              params: { ...DEFAULT_SAMPLING, maxTokens: c.greedy_ids.length, stop: [], ignoreEos: true },
            });
            let r = await run.next();
            while (!r.done) r = await run.next();
            assert.deepEqual(r.value.ids, c.greedy_ids);
            assert.equal(r.value.text, assets.tokenizer.decode(c.greedy_ids));
          }
        } finally {
          await inst.release();
        }
      },
    });
  }
}

/** fp16 graphs on WebGPU (weights, activations and KV cache in fp16) against the same float64 reference. */
for (const dir of [TINY_NAS, TINY_LLAMA]) {
  for (const groups of [[], [[3, 4, 5], [6, 7, 8]]]) {
    const name = dir.split("/").pop();
    if (groups.length && dir === TINY_LLAMA) continue;
    Deno.test({
      name: `golden parity: ${name} in fp16 on webgpu${groups.length ? " (fused)" : ""}: logits within 5e-3`,
      ignore: !HAS_WEBGPU,
      sanitizeResources: false,
      sanitizeOps: false,
      fn: async () => {
        const assets = await loadAssets(dir);
        const device = await resolveDevice("webgpu");
        const graph = await resolveGraphOptions("auto", "none", device);
        assert.equal(graph.dtype, "fp16", "auto is fp16 on an adapter with shader-f16");
        const plan = validatePlan({ ffn_groups: groups }, assets.checkpoint.config);
        const inst = await buildInstance(assets, plan, device, graph);
        const fp32 = await buildInstance(assets, plan, device);
        const vocab = assets.checkpoint.config.vocabSize;
        try {
          assert.ok(inst.weightBytes < 0.51 * fp32.weightBytes, "fp16 halves the weights");
          for (const c of (await golden(dir)).cases) {
            const logits = await inst.logitsOf(c.input_ids);
            const ref = await fp32.logitsOf(c.input_ids);
            // The fused plan is compared with its own fp32 graph (fusion changes the function);
            // the unfused one with the float64 reference.
            const want = groups.length ? ref.subarray(ref.length - vocab) : c.last_logits;
            const last = logits.subarray(logits.length - vocab);
            assert.ok(relL2(last, want) < 5e-3, `last logits rel err ${relL2(last, want)}`);
            // Decoding on the fp16 cache: the first token is the prefill's argmax, the rest real ids.
            const run = generate({
              engine: inst.engine,
              promptIds: c.input_ids,
              params: { ...DEFAULT_SAMPLING, maxTokens: 4, stop: [], ignoreEos: true },
            });
            let r = await run.next();
            while (!r.done) r = await run.next();
            assert.equal(r.value.ids[0], argmax(last));
            assert.ok(r.value.ids.every((id) => id >= 0 && id < vocab));
          }
        } finally {
          await inst.release();
          await fp32.release();
        }
      },
    });
  }
}

Deno.test("dtype: fp16 is refused on WASM, naming the flag", async () => {
  await assert.rejects(resolveGraphOptions("fp16", "none", "wasm"), (e: Error) => {
    assert.ok(e instanceof InputError && e.field === "dtype");
    assert.match(e.message, /--dtype fp16 runs on WebGPU only/);
    return true;
  });
  assert.deepEqual(await resolveGraphOptions("auto", "int4", "wasm"), {
    dtype: "fp32",
    quantize: "int4",
    integer: true,
  });
  await assert.rejects(resolveGraphOptions("fp16", "none", "cpu"), /--dtype fp16 runs on WebGPU only/);
  assert.deepEqual(await resolveGraphOptions("auto", "int4", "cpu"), {
    dtype: "fp32",
    quantize: "int4",
    accuracy: 4,
    block: 128,
    asymmetric: true,
    int8Embedding: true,
  });
  assert.deepEqual(await resolveGraphOptions("auto", "none", "cpu"), { dtype: "fp32", quantize: "none" });
});

Deno.test("CI has a WebGPU adapter (lavapipe), so the WebGPU tests above really ran", () => {
  if (Deno.env.get("CI")) assert.ok(HAS_WEBGPU, "no WebGPU adapter in CI: is mesa-vulkan-drivers installed?");
});

Deno.test("device auto: WebGPU on hardware only; a software adapter (lavapipe) falls back to WASM", async () => {
  const kind = await probeAdapter();
  assert.equal(await resolveDevice("auto"), kind === "hardware" ? "webgpu" : "wasm");
  if (kind === "none") await assert.rejects(resolveDevice("webgpu"), /no WebGPU adapter/);
  else assert.equal(await resolveDevice("webgpu"), "webgpu");
});
