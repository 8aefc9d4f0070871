import assert from "node:assert/strict";
import { join } from "node:path";
import { unfusedBlocks } from "../src/model/blocks.ts";
import { loadCheckpoint, loadConfig } from "../src/model/checkpoint.ts";
import { parseConfig } from "../src/model/config.ts";
import { PUBLISHED_CONFIGS } from "../src/model/published_configs.ts";
import { storedBytes } from "../src/onnx/builder.ts";
import { buildDecoderGraph, servedWeightBytes } from "../src/onnx/decoder.ts";
import { embedsInt8, FLOAT_WEIGHTS, type GraphOptions, NATIVE_QUANTIZED } from "../src/onnx/format.ts";
import { checkModelFits, estimateMemory, kvBudgetBytes, prefixCacheBytes } from "../src/ort/memory.ts";
import { InputError } from "../src/errors.ts";
import { decodeAdvice } from "../src/ort/decode_estimate.ts";
import { resolveGraphOptions } from "../src/ort/ort.ts";
import { HAS_WEBGPU, ROOT, TINY_NAS } from "./helpers.ts";

const LLAMA_32_1B = PUBLISHED_CONFIGS["llama-3.2-1b"];
const FP32 = FLOAT_WEIGHTS;

Deno.test("memory estimate: matches the bytes of the graph actually built, per weight format", async () => {
  const ckpt = await loadCheckpoint(TINY_NAS);
  // WASM's integer path and native onnxruntime's blocks, both with the int8 embedding.
  const host: GraphOptions[] = (["int8", "int4"] as const).flatMap((quantize) => [
    { dtype: "fp32", quantize, integer: true },
    { dtype: "fp32", quantize, ...NATIVE_QUANTIZED },
  ]);
  for (const dtype of ["fp32", "fp16"] as const) {
    for (const quantize of ["none", "int8", "int4"] as const) {
      for (
        const g of [
          { dtype, quantize } as GraphOptions,
          ...(dtype === "fp32" && quantize !== "none" ? host.filter((h) => h.quantize === quantize) : []),
        ]
      ) {
        const graph = buildDecoderGraph(ckpt, unfusedBlocks(ckpt), g);
        // An int8 table the host reads rows from is served weights too, but no device holds it.
        const built = servedWeightBytes(graph);
        const held = storedBytes(graph.model);
        const est = estimateMemory(ckpt.config, g);
        // The graph carries a few small tables besides (RoPE frequencies).
        for (
          const [what, b, e] of [["served", built, est.weightBytes], ["held", held, est.heldBytes]] as const
        ) {
          assert.ok(Math.abs(b - e) / b < 0.01, `${JSON.stringify(g)}: ${what} ${b}, estimated ${e}`);
        }
        assert.equal(built > held, embedsInt8(g));
      }
    }
  }
});

Deno.test("decode advice: a model WASM would decode slowly names --device cpu with both estimates", async () => {
  const cfg = { ...parseConfig(LLAMA_32_1B), maxPositions: 2048 };
  const advice = decodeAdvice(cfg, await resolveGraphOptions("fp32", "int8", "wasm"), "wasm");
  assert.match(
    advice ?? "",
    /^WASM decodes this model at about \d\.\d tokens\/s a stream \(1\.\d\d GB of fp32\+int8 weights read a token; .*--device cpu --quantize int4 .* about \d\d tokens\/s/,
  );
  // Not on the devices it recommends, nor for a model WASM serves fast.
  assert.equal(decodeAdvice(cfg, await resolveGraphOptions("fp32", "int4", "cpu"), "cpu"), null);
  assert.equal(decodeAdvice((await loadCheckpoint(TINY_NAS)).config, FP32, "wasm"), null);
});

Deno.test("memory check: a 1B model in fp32 is refused on WASM with the sizes and the options that fit", () => {
  const cfg = parseConfig(LLAMA_32_1B);
  assert.throws(
    () => checkModelFits(cfg, FP32, "wasm", { sequences: 1 }),
    (e: Error) => {
      assert.ok(e instanceof InputError);
      assert.match(e.message, /needs 6\.0\d GB of fp32 weights and 8\.59 GB of KV cache \(131072 tokens/);
      assert.match(e.message, /more than WASM's 4\.03 GB heap/);
      assert.match(e.message, /--device cpu \(native onnxruntime: no heap limit\), --device webgpu/);
      return true;
    },
  );
  // Native onnxruntime has no heap limit; it is refused only what the host cannot hold.
  checkModelFits(cfg, FP32, "cpu", { sequences: 1, freeHostBytes: 20e9 });
  assert.throws(
    () => checkModelFits(cfg, FP32, "cpu", { sequences: 1, freeHostBytes: 8e9 }),
    /needs 6\.0\d GB of fp32 weights and 8\.59 GB of KV cache \(131072 tokens x 1\), more than the 8\.00 GB of memory free here; try --quantize/,
  );
  const short = { ...cfg, maxPositions: 2048 };
  assert.throws(
    () => checkModelFits(short, FP32, "wasm", { sequences: 1 }),
    /--quantize int8 \(\d\.\d\d GB\), --quantize int4/,
  );
  checkModelFits(short, { dtype: "fp32", quantize: "int4" }, "wasm", { sequences: 1 });
  checkModelFits(short, { dtype: "fp32", quantize: "int8" }, "wasm", { sequences: 1 });
  checkModelFits(cfg, FP32, "webgpu", { sequences: 1, maxBufferBytes: 2 ** 31 });
  assert.throws(
    () => checkModelFits(cfg, FP32, "webgpu", { sequences: 1, maxBufferBytes: 2 ** 28 }),
    /largest buffer.*try --dtype fp16, --quantize int8 or int4/,
  );
  // fp16 halves the 1 GB embedding: it fits a 512 MiB buffer where fp32 did not.
  checkModelFits(cfg, { dtype: "fp16", quantize: "none" }, "webgpu", {
    sequences: 1,
    maxBufferBytes: 2 ** 29,
  });
});

Deno.test("cli: a model that cannot fit is refused before any weight is read (exit 2)", async () => {
  const dir = await Deno.makeTempDir();
  // config.json alone: reaching the loader would fail differently ("no model.safetensors").
  await Deno.writeTextFile(join(dir, "config.json"), JSON.stringify(LLAMA_32_1B));
  const run = async (...args: string[]) => {
    const out = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        join(ROOT, "main.ts"),
        "logits",
        "--model",
        dir,
        "--prompt",
        "x",
        "--device",
        "wasm",
        ...args,
      ],
      stderr: "piped",
      stdout: "null",
    }).output();
    return { code: out.code, stderr: new TextDecoder().decode(out.stderr) };
  };
  const refused = await run();
  assert.equal(refused.code, 2);
  assert.match(refused.stderr, /--model: the model needs 6\.0\d GB of fp32 weights/);
  const fits = await run("--quantize", "int4", "--max-context", "2048");
  assert.equal(fits.code, 2);
  assert.match(fits.stderr, /no model\.safetensors/, "past the memory check, on to loading");
});

Deno.test("KV budget: the default from the device, a requested one checked against WASM's heap", async () => {
  const cfg = await loadConfig(TINY_NAS);
  const fp32 = FP32;
  assert.equal(
    kvBudgetBytes(cfg, fp32, "wasm", undefined, 64 * 2 ** 30),
    2 ** 30,
    "1 GiB when memory is plenty",
  );
  assert.equal(kvBudgetBytes(cfg, fp32, "wasm", undefined, 2 ** 30), 2 ** 28, "a quarter of what is free");
  assert.equal(kvBudgetBytes(cfg, fp32, "webgpu", 64), 64 * 2 ** 20);
  assert.throws(
    () => kvBudgetBytes(cfg, fp32, "wasm", 4000),
    (e: Error) =>
      e instanceof InputError && (e as InputError).field === "kv_cache_mb" && /twice/.test(e.message),
  );
  // A tiny free memory never leaves less than one full-context sequence.
  const one = estimateMemory(cfg, fp32).kvBytesPerToken * cfg.maxPositions;
  assert.equal(kvBudgetBytes(cfg, fp32, "wasm", undefined, 1), one);
});

Deno.test("prefix cache: an eighth of the served weights, at least 64 MB, within the KV budget; a requested one checked", async () => {
  const cfg = parseConfig(LLAMA_32_1B);
  const int4 = await resolveGraphOptions("fp32", "int4", "cpu");
  const served = estimateMemory(cfg, int4).weightBytes;
  // The 1B model's whole 131072-token context floors its budget at 8.6 GB; its kept prefixes get 116 MB.
  const budget = kvBudgetBytes(cfg, int4, "cpu", undefined, 64 * 2 ** 30);
  assert.ok(budget > 8e9, `budget ${budget}`);
  assert.equal(prefixCacheBytes(cfg, int4, budget), served / 8);
  assert.ok(served / 8 > 110e6 && served / 8 < 120e6, `${served / 8}`);
  const tiny = { ...cfg, vocabSize: 1000, layers: cfg.layers.slice(0, 1) };
  assert.equal(prefixCacheBytes(tiny, int4, budget), 64 * 2 ** 20, "a small model's floor");
  assert.equal(prefixCacheBytes(tiny, int4, 2 ** 20), 2 ** 20, "never more than the budget");
  assert.equal(prefixCacheBytes(cfg, int4, budget, 0), 0);
  assert.equal(prefixCacheBytes(cfg, int4, 2 ** 30, 512), 2 ** 29);
  assert.throws(
    () => prefixCacheBytes(cfg, int4, 2 ** 28, 512),
    (e: Error) =>
      e instanceof InputError && e.field === "prefix_cache_mb" &&
      /512 MB .* the 256 MB KV budget/.test(e.message),
  );
});

Deno.test("cli: serve refuses a KV budget WASM's heap cannot hold beside the weights (exit 2, the flag named)", async () => {
  const out = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      join(ROOT, "main.ts"),
      "serve",
      "--port",
      "0",
      "--device",
      "wasm",
      "--kv-cache-mb",
      "4000",
    ],
    stdout: "null",
    stderr: "piped",
  }).output();
  assert.equal(out.code, 2);
  assert.match(
    new TextDecoder().decode(out.stderr),
    /--kv-cache-mb: 4000 MB of KV cache does not fit WASM's heap/,
  );
});

for (
  const [device, args, message] of [
    [
      "wasm",
      ["--kv-cache-mb", "100", "--prefix-cache-mb", "200"],
      /--prefix-cache-mb: a prefix cache of 200 MB is more than the 100 MB KV budget/,
    ],
    [
      "webgpu",
      ["--prefix-cache-mb", "10"],
      /--prefix-cache-mb: it sizes what the host devices .* on webgpu they stay in their slots/,
    ],
  ] as const
) {
  Deno.test({
    name: `cli: serve refuses a --prefix-cache-mb it cannot honour on ${device} (exit 2, the flag named)`,
    ignore: device === "webgpu" && !HAS_WEBGPU,
    fn: async () => {
      const out = await new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", join(ROOT, "main.ts"), "serve", "--port", "0", "--device", device, ...args],
        stdout: "null",
        stderr: "piped",
      }).output();
      assert.equal(out.code, 2);
      assert.match(new TextDecoder().decode(out.stderr), message);
    },
  });
}
