import type { GrammarSpec } from "../src/sampling/grammar.ts";
import { Ajv } from "ajv";
import assert from "node:assert/strict";
import { UNFUSED } from "../src/fusion/plan.ts";
import { GraphBuilder } from "../src/onnx/builder.ts";
import { FLOAT_WEIGHTS } from "../src/onnx/format.ts";
import { createSession } from "../src/ort/ort.ts";
import { buildInstance, loadAssets, type ModelInstance } from "../src/instance/build.ts";
import { generate, type GenerateParams } from "../src/decode/generate.ts";
import { GpuSampler } from "../src/ort/gpu_sampler.ts";
import { DEFAULT_SAMPLING } from "../src/sampling/sampling.ts";
import { FP32_INT4, FP32_INT8, planFormsMatchWasm, runToEnd } from "./engine_helpers.ts";
import { join } from "node:path";
import { golden, HAS_WEBGPU, ROOT, TINY_LLAMA, TINY_NAS } from "./helpers.ts";
import { post, readSse, startServer } from "./server_helpers.ts";

/** Every GPU readback in this process (onnxruntime's included) goes through mapAsync: sizes and overlap. */
const readbacks: number[] = [];
let inFlight = 0;
let maxInFlight = 0;
if (HAS_WEBGPU) {
  const original = GPUBuffer.prototype.mapAsync;
  GPUBuffer.prototype.mapAsync = function (...args: Parameters<GPUBuffer["mapAsync"]>) {
    readbacks.push(this.size);
    maxInFlight = Math.max(maxInFlight, ++inFlight);
    return original.apply(this, args).finally(() => inFlight--);
  };
}

async function instances(): Promise<
  { gpu: ModelInstance; wasm: ModelInstance; prompt: number[]; ids: number[] }
> {
  const assets = await loadAssets(TINY_NAS);
  const c = (await golden(TINY_NAS)).cases[0];
  return {
    gpu: await buildInstance(assets, UNFUSED, "webgpu"),
    wasm: await buildInstance(assets, UNFUSED, "wasm"),
    prompt: c.input_ids,
    ids: c.greedy_ids,
  };
}

Deno.test({
  name: "GPU engine: golden greedy ids, logits never read back, one readback in flight, stops as on WASM",
  ignore: !HAS_WEBGPU,
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const { gpu, wasm, prompt, ids } = await instances();
    try {
      readbacks.length = 0;
      maxInFlight = 0;
      const greedy = await runToEnd(gpu.engine, prompt, { ignoreEos: true, maxTokens: ids.length });
      assert.deepEqual(greedy.summary.ids, ids);
      const vocabBytes = 4096 * 4;
      assert.ok(readbacks.length > 0 && readbacks.every((b) => b < vocabBytes), `read back ${readbacks}`);
      assert.equal(maxInFlight, 1, "the engine keeps one readback in flight");
      // A stop string found at a readback ends the text where WASM's host loop ends it.
      const reasons: string[] = [];
      for (const stop of [["\n"], ["(", "x"], ["):"]]) {
        const a = await runToEnd(gpu.engine, prompt, { stop });
        const b = await runToEnd(wasm.engine, prompt, { stop });
        assert.equal(a.summary.text, b.summary.text);
        assert.equal(a.summary.finishReason, b.summary.finishReason);
        reasons.push(a.summary.finishReason);
      }
      assert.ok(reasons.includes("stop"), `some stop string was met (${reasons})`);
    } finally {
      await gpu.release();
      await wasm.release();
    }
  },
});

Deno.test({
  name:
    "GPU engine: constrained rows masked on the GPU answer as WASM's, validate when sampled, free rows unchanged",
  ignore: !HAS_WEBGPU,
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const { gpu, wasm, prompt, ids } = await instances();
    const schema = {
      type: "object",
      properties: {
        name: { type: "string", maxLength: 8 },
        n: { type: "integer", minimum: 0, maximum: 999 },
      },
      required: ["name", "n"],
      additionalProperties: false,
    };
    const specs: [GrammarSpec, (text: string) => boolean][] = [
      [
        { field: "guided_choice", type: "choice", choices: ["yes", "no", "maybe"] },
        (t) => ["yes", "no", "maybe"].includes(t),
      ],
      [
        { field: "response_format", type: "json_schema", schema: JSON.stringify(schema) },
        (t) => new Ajv().validate(schema, JSON.parse(t)),
      ],
      [
        { field: "guided_regex", type: "regex", pattern: "[a-z]{3}-[0-9]{2}" },
        (t) => /^[a-z]{3}-[0-9]{2}$/.test(t),
      ],
    ];
    try {
      for (const [spec, valid] of specs) {
        await gpu.engine.checkGrammar(spec);
        const params = { grammar: spec, maxTokens: 48 };
        const [a, b] = [
          await runToEnd(gpu.engine, prompt, params),
          await runToEnd(wasm.engine, prompt, params),
        ];
        assert.equal(a.summary.text, b.summary.text, `${spec.type}: greedy under the mask as on WASM`);
        assert.ok(valid(a.summary.text), `${spec.type}: ${a.summary.text}`);
        // Sampled, beside a free row in the same batch: the constrained one validates, its logprobs
        // are of allowed tokens, and the free one decodes as it would alone.
        const [drawn, free] = await Promise.all([
          runToEnd(gpu.engine, prompt, { ...params, temperature: 1, seed: 7, logprobs: 3 }),
          runToEnd(gpu.engine, prompt, { ignoreEos: true, maxTokens: ids.length }),
        ]);
        assert.ok(valid(drawn.summary.text), `${spec.type} sampled: ${drawn.summary.text}`);
        for (const lp of drawn.logprobs) {
          assert.ok(Number.isFinite(lp.logprob) && lp.top.every((t) => Number.isFinite(t.logprob)), lp.token);
        }
        assert.deepEqual(free.summary.ids, ids);
      }
    } finally {
      await gpu.release();
      await wasm.release();
    }
  },
});

Deno.test({
  name:
    "GPU engine: a constrained token drawn outside its mask ends the answer with an error, never its text; the engine serves on",
  ignore: !HAS_WEBGPU,
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const gpu = await buildInstance(await loadAssets(TINY_NAS), UNFUSED, "webgpu");
    const engine = gpu.engine;
    const prompt = (await golden(TINY_NAS)).cases[0].input_ids;
    const schema = {
      type: "object",
      properties: { name: { type: "string", maxLength: 8 }, n: { type: "integer" } },
      required: ["name", "n"],
      additionalProperties: false,
    };
    const spec: GrammarSpec = {
      field: "response_format",
      type: "json_schema",
      schema: JSON.stringify(schema),
    };
    const params = { grammar: spec, maxTokens: 40, temperature: 0.7, seed: 5 };
    const sample = GpuSampler.prototype.sample;
    try {
      // The first draw, which the schema allows only "{", made greedy over the whole vocabulary.
      let dropped = false;
      GpuSampler.prototype.sample = function (logits, rows) {
        const faulty = rows.map((r) => {
          if (!r.masked || r.index !== 0 || dropped) return r;
          dropped = true;
          return { ...r, masked: false, params: { ...r.params, temperature: 0 } };
        });
        return sample.call(this, logits, faulty);
      };
      const chunks: string[] = [];
      await assert.rejects(
        async () => {
          for await (
            const chunk of generate({
              engine,
              promptIds: prompt,
              params: { ...DEFAULT_SAMPLING, stop: [], ...params },
            })
          ) {
            chunks.push(chunk.text);
          }
        },
        /outside the sequence's grammar/,
      );
      assert.ok(dropped);
      assert.equal(chunks.join(""), "", "nothing of the refused token was sent");
      GpuSampler.prototype.sample = sample;
      const clean = await runToEnd(engine, prompt, params);
      assert.ok(new Ajv().validate(schema, JSON.parse(clean.summary.text)), clean.summary.text);
    } finally {
      GpuSampler.prototype.sample = sample;
      await gpu.release();
    }
  },
});

Deno.test({
  name: "GPU engine: log-probabilities as WASM's (1e-3), seeded draws repeat, every sampling mode runs",
  ignore: !HAS_WEBGPU,
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const { gpu, wasm, prompt } = await instances();
    try {
      const scored = { ignoreEos: true, maxTokens: 8, logprobs: 3 };
      const a = await runToEnd(gpu.engine, prompt, scored);
      const b = await runToEnd(wasm.engine, prompt, scored);
      assert.deepEqual(a.summary.ids, b.summary.ids);
      assert.equal(a.logprobs.length, b.logprobs.length);
      a.logprobs.forEach((lp, i) => {
        assert.equal(lp.token, b.logprobs[i].token);
        assert.ok(
          Math.abs(lp.logprob - b.logprobs[i].logprob) < 1e-3,
          `${lp.logprob} vs ${b.logprobs[i].logprob}`,
        );
        assert.deepEqual(lp.top.map((t) => t.token), b.logprobs[i].top.map((t) => t.token));
      });
      const modes: Partial<GenerateParams>[] = [
        { temperature: 1.5 },
        { temperature: 0.8, topK: 20 },
        { temperature: 0.9, topP: 0.7 },
        { temperature: 1, repetitionPenalty: 1.3, presencePenalty: 0.5, frequencyPenalty: 0.5 },
      ];
      for (const mode of modes) {
        const draw = (seed: number) =>
          runToEnd(gpu.engine, prompt, { ...mode, seed, ignoreEos: true, maxTokens: 8 });
        const [x, y, z] = await Promise.all([draw(11), draw(11), draw(12)]);
        assert.deepEqual(
          x.summary.ids,
          y.summary.ids,
          `${JSON.stringify(mode)}: the same seed draws the same`,
        );
        assert.equal(x.summary.completionTokens, 8);
        assert.ok(z.summary.ids.every((id) => id >= 0 && id < 4096));
      }
      const seeds = await Promise.all(
        [21, 22, 23, 24].map((seed) =>
          runToEnd(gpu.engine, prompt, { temperature: 1.5, seed, ignoreEos: true, maxTokens: 8 })
        ),
      );
      assert.ok(new Set(seeds.map((s) => s.summary.ids.join())).size > 1, "different seeds draw differently");
    } finally {
      await gpu.release();
      await wasm.release();
    }
  },
});

Deno.test({
  name:
    "GPU engine: more sequences than slots wait their turn; kept slots give prefixes; cancel frees a slot",
  ignore: !HAS_WEBGPU,
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const assets = await loadAssets(TINY_NAS);
    const inst = await buildInstance(assets, UNFUSED, "webgpu", undefined, undefined, undefined, {
      slots: 2,
      kvBudgetBytes: 2 ** 22,
    });
    try {
      assert.deepEqual(inst.decoder!.layout.buckets, [1, 2]);
      const prompt = assets.tokenizer.encode("def main():\n    x = 1\n");
      const params = { ignoreEos: true, maxTokens: 10 };
      const five = await Promise.all(Array.from({ length: 5 }, () => runToEnd(inst.engine, prompt, params)));
      assert.ok(five.every((r) => r.summary.ids.join() === five[0].summary.ids.join()), "greedy: one text");
      assert.ok(inst.engine.peakRows <= 2);
      assert.ok(
        five.slice(1).some((r) => r.summary.cachedTokens === prompt.length - 1),
        "a kept prefix was used",
      );
      // A follow-up extending a finished conversation starts from its kept slot.
      const follow = [...prompt, ...five[0].summary.ids, ...assets.tokenizer.encode("    return")];
      const again = await runToEnd(inst.engine, follow, { maxTokens: 4 });
      assert.equal(again.summary.cachedTokens, prompt.length + 9, "the prompt and the 9 tokens fed back");
      const abort = new AbortController();
      const long = generate({
        engine: inst.engine,
        promptIds: prompt,
        params: { ...DEFAULT_SAMPLING, stop: [], maxTokens: 400, ignoreEos: true },
        signal: abort.signal,
      });
      await long.next();
      abort.abort();
      let r = await long.next();
      while (!r.done) r = await long.next();
      assert.equal(r.value.finishReason, "cancelled");
      const after = await Promise.all([
        runToEnd(inst.engine, prompt, params),
        runToEnd(inst.engine, prompt, params),
      ]);
      assert.ok(after.every((x) => x.summary.completionTokens === 10), "both slots serve again");
    } finally {
      await inst.release();
    }
  },
});

Deno.test({
  name:
    "GPU engine over HTTP: a prompt longer than a KV slot is 400 naming the sizes; output stops at the slot's end",
  ignore: !HAS_WEBGPU,
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    // tiny-nas in fp16: 6 attention layers x K and V x 2 heads x 64 x 2 bytes = 3072 bytes a token, so
    // 0.25 MB over 2 slots is 42 tokens each.
    const server = await startServer(["--device", "webgpu", "--kv-cache-mb", "0.25", "--max-active", "2"]);
    await server.ready;
    try {
      const long = await post(server.base, "/v1/completions", {
        prompt: "x = 1\n".repeat(20),
        max_tokens: 4,
      });
      assert.equal(long.status, 400);
      const err = (await long.json()).error;
      assert.equal(err.param, "prompt");
      assert.match(err.message, /prompt tokens and one generated do not fit a KV slot of 42 tokens/);
      const outs = await Promise.all([0, 1, 2].map(async (seed) => {
        const res = await post(server.base, "/v1/completions", {
          prompt: "def main(",
          max_tokens: 400,
          temperature: 1,
          seed,
        });
        return { status: res.status, body: await res.json() };
      }));
      for (const o of outs) {
        assert.equal(o.status, 200);
        const { usage, choices } = o.body;
        assert.equal(choices[0].finish_reason, "length");
        assert.equal(usage.prompt_tokens + usage.completion_tokens, 42, "the slot's end is the context");
      }
      const streamed = await readSse(
        await post(server.base, "/v1/completions", { prompt: "import os\n", max_tokens: 12, stream: true }),
      );
      assert.ok(streamed.done);
    } finally {
      await server.stop();
    }
  },
});

Deno.test({
  name: "GPU engine over HTTP: tool calls and response_format under masks drawn on the GPU",
  ignore: !HAS_WEBGPU,
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const server = await startServer([
      "--device",
      "webgpu",
      "--chat-template",
      join(ROOT, "templates", "chatml.jinja"),
    ]);
    await server.ready;
    const parameters = {
      type: "object",
      properties: {
        city: { type: "string", maxLength: 12 },
        days: { type: "integer", minimum: 1, maximum: 7 },
      },
      required: ["city", "days"],
      additionalProperties: false,
    };
    const ajv = new Ajv();
    try {
      const res = await post(server.base, "/v1/chat/completions", {
        messages: [{ role: "user", content: "Weather in Oslo?" }],
        tools: [{ type: "function", function: { name: "get_weather", parameters } }],
        tool_choice: "required",
        parallel_tool_calls: false,
        max_tokens: 120,
      });
      assert.equal(res.status, 200);
      const { choices } = await res.json();
      assert.equal(choices[0].finish_reason, "tool_calls", JSON.stringify(choices[0].message));
      const call = choices[0].message.tool_calls[0].function;
      assert.equal(call.name, "get_weather");
      assert.ok(ajv.validate(parameters, JSON.parse(call.arguments)), call.arguments);
      const json = await post(server.base, "/v1/completions", {
        prompt: "def main(",
        max_tokens: 48,
        response_format: { type: "json_schema", json_schema: { name: "w", schema: parameters } },
      });
      assert.equal(json.status, 200);
      const text = (await json.json()).choices[0].text;
      assert.ok(ajv.validate(parameters, JSON.parse(text)), text);
    } finally {
      await server.stop();
    }
  },
});

Deno.test({
  name:
    "GPU engine: every plan form and weight format runs wholly on the WebGPU provider, as on WASM (logits 1e-3, greedy ids)",
  ignore: !HAS_WEBGPU,
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    // The decoder's sessions refuse a CPU fallback; the same option does refuse a graph with a CPU node.
    const g = new GraphBuilder();
    g.op("Det", [g.input("x", "float32", [4, 4])], {}, "y");
    g.output("y", "float32", []);
    await assert.rejects(
      createSession("webgpu", g.encode("det"), {
        executionProviders: [{ name: "webgpu" }],
        logSeverityLevel: 3,
        extra: { session: { disable_cpu_ep_fallback: "1" } },
      }),
      /assigned to the default CPU EP/,
    );
    await planFormsMatchWasm("webgpu", [FLOAT_WEIGHTS, FP32_INT4, FP32_INT8]);
  },
});

/**
 * Split decode steps (src/onnx/split_k.ts) against unsplit ones and the float64 references: the
 * shipped models' inner widths are below the default's threshold, so the split is forced here, every
 * linear but the head cut into parts of 32 to 128: captured and not, fp32 and fp16, unfused and fused.
 */
Deno.test({
  name: "GPU engine: split decode steps give the golden greedy ids, captured or not, fp32 and fp16",
  ignore: !HAS_WEBGPU,
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const forced = { workgroups: 4096, minPart: 32, minInner: 256 };
    const fused = { version: 1 as const, ffn_groups: [[3, 4, 5]] };
    const cases = [
      { dir: TINY_NAS, plan: UNFUSED, dtype: "fp32", capture: true },
      { dir: TINY_NAS, plan: UNFUSED, dtype: "fp32", capture: false },
      { dir: TINY_NAS, plan: fused, dtype: "fp16", capture: true },
      { dir: TINY_LLAMA, plan: UNFUSED, dtype: "fp32", capture: true },
    ] as const;
    for (const { dir, plan, dtype, capture } of cases) {
      const assets = await loadAssets(dir);
      const c = (await golden(dir)).cases[0];
      const graph = { dtype, quantize: "none" as const };
      const what = `${dir.split("/").pop()} ${
        JSON.stringify(plan.ffn_groups ?? [])
      } ${dtype} capture ${capture}`;
      const build = (splitK: typeof forced | false) =>
        buildInstance(assets, plan, "webgpu", graph, undefined, undefined, { splitK, capture, slots: 2 });
      const split = await build(forced);
      const whole = await build(false);
      try {
        assert.ok(split.nodeCount > whole.nodeCount + 20, `${what}: ${split.nodeCount} nodes split`);
        const a = await runToEnd(split.engine, c.input_ids, { ignoreEos: true, maxTokens: 8 });
        const b = await runToEnd(whole.engine, c.input_ids, { ignoreEos: true, maxTokens: 8 });
        assert.deepEqual(a.summary.ids, b.summary.ids, what);
        if (plan === UNFUSED) assert.deepEqual(a.summary.ids, c.greedy_ids.slice(0, 8), what);
      } finally {
        await split.release();
        await whole.release();
      }
    }
  },
});
