import assert from "node:assert/strict";
import {
  BatchEngine,
  JOIN_COPY_BYTES,
  joinersTaken,
  PREFILL_TURN_MS,
  prefillLimit,
  runFits,
  runPrefillTokens,
  turnPrefillMs,
} from "../src/decode/batch_engine.ts";
import { PREFILL_CHUNK } from "../src/decode/engine_base.ts";
import { buildInstance, type Engine, loadAssets } from "../src/instance/build.ts";
import { generate, type GenerateParams, type GenerationSummary } from "../src/decode/generate.ts";
import { asBatch, attentionFor, ModelSession, samplesInGraph } from "../src/ort/session.ts";
import { type BatchCache, bufferOf } from "../src/ort/kv_batch.ts";
import { buildDecoderGraph } from "../src/onnx/decoder.ts";
import { applyPlan } from "../src/fusion/apply.ts";
import { DEFAULT_SAMPLING } from "../src/sampling/sampling.ts";
import { type FusionPlan, UNFUSED } from "../src/fusion/plan.ts";
import { EVAL_TEXT, HAS_NATIVE, HAS_WEBGPU, TINY_LLAMA, TINY_NAS } from "./helpers.ts";
import { onHostDevices } from "./engine_helpers.ts";
import { FLOAT_WEIGHTS, type GraphOptions } from "../src/onnx/format.ts";
import type { Device } from "../src/ort/ort.ts";
import { post, readSse, startServer } from "./server_helpers.ts";

const params = (maxTokens: number, extra: Partial<GenerateParams> = {}): GenerateParams => ({
  ...DEFAULT_SAMPLING,
  maxTokens,
  stop: [],
  ignoreEos: true,
  ...extra,
});

/** Runs every request through one engine at once; resolves with each one's summary and streamed text. */
function runAll(engine: Engine, reqs: { prompt: number[]; params: GenerateParams }[]) {
  return Promise.all(
    reqs.map((r, id) =>
      new Promise<GenerationSummary & { streamed: string }>((resolve, reject) => {
        let streamed = "";
        engine.submit(id, r.prompt, r.params, {
          chunk: (c) => (streamed += c.text),
          done: (s) => resolve({ ...s, streamed }),
          failed: reject,
        });
      })
    ),
  );
}

/** An engine over unfused tiny-nas on WASM, its context cut to `maxPositions` when given. */
async function unfusedEngine(maxPositions?: number) {
  const assets = await loadAssets(TINY_NAS);
  const inst = await buildInstance(assets, UNFUSED, "wasm");
  const cfg = assets.checkpoint.config;
  const engine = new BatchEngine(
    inst.session!,
    assets.tokenizer,
    cfg.eosTokenIds,
    maxPositions ?? cfg.maxPositions,
  );
  return { assets, inst, engine };
}

/** An engine over the session of `unfusedEngine`'s instance with a KV budget, slots and a prefix cache cap. */
function budgetedEngine(
  { assets, inst }: Awaited<ReturnType<typeof unfusedEngine>>,
  keepBytes: number,
  slots: number,
  prefixBytes?: number,
) {
  const cfg = assets.checkpoint.config;
  return new BatchEngine(
    inst.session!,
    assets.tokenizer,
    cfg.eosTokenIds,
    cfg.maxPositions,
    () => {},
    keepBytes,
    slots,
    prefixBytes,
  );
}

const HALF_WEIGHTS: GraphOptions = { dtype: "fp16", quantize: "none" };
const CASES: [string, string, FusionPlan, Device, GraphOptions][] = [
  ["tiny-nas, fused", TINY_NAS, { version: 1, ffn_groups: [[3, 4, 5]] }, "wasm", FLOAT_WEIGHTS],
  ["tiny-llama, unfused", TINY_LLAMA, UNFUSED, "wasm", FLOAT_WEIGHTS],
  [
    "tiny-nas, fused, WebGPU fp32",
    TINY_NAS,
    { version: 1, ffn_groups: [[3, 4, 5]] },
    "webgpu",
    FLOAT_WEIGHTS,
  ],
  // fp16 is what WebGPU serves by default: its caches are halves, repacked at every join and leave.
  ["tiny-nas, fused, WebGPU fp16", TINY_NAS, { version: 1, ffn_groups: [[3, 4, 5]] }, "webgpu", HALF_WEIGHTS],
];
for (const [name, dir, plan, device, format] of CASES) {
  Deno.test({
    name:
      `batched decode (${name}): 16 sequences of different lengths decode as one batch, each as it would alone`,
    ignore: device === "webgpu" && !HAS_WEBGPU,
    sanitizeResources: false,
    sanitizeOps: false,
    fn: async () => {
      const assets = await loadAssets(dir);
      const inst = await buildInstance(assets, plan, device, format);
      const text = await Deno.readTextFile(EVAL_TEXT);
      const ids = assets.tokenizer.encode(text);
      // Prompt lengths from 1 token to more than two prefill chunks; max_tokens from 1 to 24.
      const reqs = Array.from({ length: 16 }, (_, i) => ({
        prompt: ids.slice(i * 37, i * 37 + [1, 5, 17, 40, 2 * PREFILL_CHUNK + 30][i % 5]),
        params: params(1 + ((i * 7) % 24), i % 4 === 3 ? { temperature: 0.8, topK: 20, seed: 1000 + i } : {}),
      }));
      const alone: string[] = [];
      for (const r of reqs) {
        const it = generate({ engine: inst.engine, promptIds: r.prompt, params: r.params });
        let s = await it.next();
        while (!s.done) s = await it.next();
        alone.push(s.value.ids.join(","));
      }
      const engine = inst.engine;
      const together = await runAll(engine, reqs);
      together.forEach((s, i) => {
        assert.equal(s.ids.join(","), alone[i], `request ${i} (prompt ${reqs[i].prompt.length} tokens)`);
        assert.equal(s.completionTokens, reqs[i].params.maxTokens);
        assert.equal(s.streamed, s.text, "the streamed chunks add up to the text");
      });
      // Host engines prefill ~40 ms a turn while rows decode, so the short requests finish before the
      // long prompts join: how many overlap depends on the machine's speed.
      assert.ok(engine.peakRows >= 4, `the sequences really shared steps (peak batch ${engine.peakRows})`);
      await engine.idle();
      assert.equal(engine.kvBytes, 0, "every cache freed");
      await inst.release();
    },
  });
}

Deno.test({
  name:
    "caches written in place (native) outgrow their room, rows joining and leaving, and decode as copied caches do",
  ignore: !HAS_NATIVE,
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const assets = await loadAssets(TINY_NAS);
    const cfg = assets.checkpoint.config;
    const ids = assets.tokenizer.encode(await Deno.readTextFile(EVAL_TEXT));
    // Prompts from 1 to 300 tokens, up to 120 new ones: rows outgrow their first room (32 positions
    // past the longest) several times, some while others join and leave.
    const reqs = Array.from({ length: 8 }, (_, i) => ({
      prompt: ids.slice(i * 53, i * 53 + [1, 9, 40, 300][i % 4]),
      params: params(20 + 100 * (i % 2)),
    }));
    // The reference: each step's presents copied out as the next step's caches (no newKv outputs).
    const copied = await ModelSession.create(
      buildDecoderGraph(assets.checkpoint, applyPlan(assets.blocks, UNFUSED)),
      "wasm",
      cfg.vocabSize,
    );
    const reference = await runAll(
      new BatchEngine(copied, assets.tokenizer, cfg.eosTokenIds, cfg.maxPositions),
      reqs,
    );
    await copied.release();
    const inst = await buildInstance(assets, UNFUSED, "cpu");
    try {
      assert.ok(inst.session!.graph.newKv, "native steps fetch only the positions they wrote");
      const got = await runAll(inst.engine, reqs);
      got.forEach((s, i) => assert.equal(s.ids.join(","), reference[i].ids.join(","), `request ${i}`));
      assert.ok(inst.engine.peakRows >= 4, `rows shared steps (peak ${inst.engine.peakRows})`);
    } finally {
      await inst.release();
    }
  },
});

Deno.test({
  name: "batched decode: cancel ends one sequence, the rest go on; a full context ends a row",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const { assets, inst, engine } = await unfusedEngine(40);
    const prompt = assets.tokenizer.encode("def main():\n    x = 1\n");
    const done = runAll(engine, [
      { prompt, params: params(200) },
      { prompt, params: params(30) },
      { prompt: prompt.slice(0, 3), params: params(200) },
    ]);
    engine.cancel(0);
    const [cancelled, short, capped] = await done;
    assert.equal(cancelled.finishReason, "cancelled");
    assert.equal(short.finishReason, "length");
    assert.equal(capped.finishReason, "length");
    assert.equal(capped.promptTokens + capped.completionTokens, 40, "stopped at the context of 40");
    await inst.release();
  },
});

Deno.test({
  name:
    "KV budget over HTTP: a request that can never fit is 400 naming the sizes; the rest wait their turn within the budget",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    // tiny-nas: 6 attention layers x K and V x 2 heads x 64 x 4 bytes = 6144 bytes a token; 1 MB = 170 tokens.
    const server = await startServer(["--device", "wasm", "--kv-cache-mb", "1", "--max-active", "8"]);
    await server.ready;
    try {
      const big = await post(server.base, "/v1/completions", { prompt: "def main(", max_tokens: 300 });
      assert.equal(big.status, 400);
      const err = (await big.json()).error;
      assert.equal(err.param, "max_tokens");
      assert.match(
        err.message,
        /need 1\.8 MB of KV cache, more than the whole budget of 1\.0 MB \(--kv-cache-mb\)/,
      );
      // Each can grow to ~64 tokens (393 KB): two decode together, a third would pass 1 MB.
      let peakUsed = 0;
      let peakReserved = 0;
      let running = true;
      const watch = (async () => {
        while (running) {
          const kv = (await (await fetch(`${server.base}/health`)).json()).kv_cache;
          peakUsed = Math.max(peakUsed, kv.used_bytes);
          peakReserved = Math.max(peakReserved, kv.reserved_bytes);
          await new Promise((r) => setTimeout(r, 10));
        }
      })();
      const outs = await Promise.all(Array.from({ length: 4 }, async (_, i) => {
        const res = await post(server.base, "/v1/completions", {
          prompt: "def main(",
          max_tokens: 60,
          temperature: 0.8,
          seed: i,
        });
        return { status: res.status, body: await res.json() };
      }));
      running = false;
      await watch;
      assert.deepEqual(outs.map((o) => o.status), [200, 200, 200, 200]);
      assert.ok(peakReserved > 0 && peakReserved <= 2 ** 20, `reserved at most the budget (${peakReserved})`);
      assert.ok(peakUsed <= 2 ** 20, `held at most the budget (${peakUsed})`);
      const metrics = await (await fetch(`${server.base}/metrics`)).text();
      assert.match(metrics, /^fusedge_kv_cache_budget_bytes 1048576$/m);
      // What stays held is finished sequences kept for prefix reuse, within the budget.
      assert.ok(Number(metrics.match(/^fusedge_kv_cache_bytes (\d+)$/m)![1]) <= 2 ** 20);
      assert.match(metrics, /^fusedge_kv_cache_reserved_bytes 0$/m);
    } finally {
      await server.stop();
    }
  },
});

Deno.test({
  name:
    "prefix reuse: a cached prefix gives the cold prefill's logits (1e-5); the engine reuses kept, live and just-prefilled caches",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const assets = await loadAssets(TINY_NAS);
    const inst = await buildInstance(assets, { version: 1, ffn_groups: [[3, 4, 5]] }, "wasm");
    const s = inst.session!;
    const cfg = assets.checkpoint.config;
    const vocab = cfg.vocabSize;
    const ids = assets.tokenizer.encode(await Deno.readTextFile(EVAL_TEXT)).slice(0, 60);
    // The prefix's cache as decoding leaves it: 20 tokens prefilled, 30 fed one step at a time.
    let cache = asBatch((await s.step(ids.slice(0, 20), s.emptyCache())).cache);
    for (let i = 20; i < 50; i++) cache = (await s.decodeBatch([ids[i]], cache)).cache;
    const prefix = await s.packRows([{ cache, row: 0, length: 45 }]);
    const warm = await s.step(ids.slice(45), { length: 45, tensors: prefix.tensors });
    const cold = await s.logitsOf(ids);
    const a = warm.logits.subarray(warm.logits.length - vocab);
    const b = cold.subarray(cold.length - vocab);
    const scale = Math.max(...b.map(Math.abs));
    const err = Math.max(...a.map((v, i) => Math.abs(v - b[i]))) / scale;
    assert.ok(err < 1e-5, `relative error ${err}`);

    const run = async (engine: BatchEngine, prompts: number[][]) =>
      await runAll(engine, prompts.map((prompt) => ({ prompt, params: params(12) })));
    const P = ids.slice(0, 30);
    const cold2 = new BatchEngine(s, assets.tokenizer, cfg.eosTokenIds, cfg.maxPositions);
    const warm2 = new BatchEngine(s, assets.tokenizer, cfg.eosTokenIds, cfg.maxPositions, () => {}, 2 ** 24);
    const [first] = await run(warm2, [P]);
    assert.equal(first.cachedTokens, 0);
    // A follow-up that extends the finished conversation: its prompt and output are cached.
    const follow = [...P, ...first.ids.slice(0, 8), ...ids.slice(40, 45)];
    const [again] = await run(warm2, [follow]);
    assert.equal(again.cachedTokens, 30 + 8, "the kept prefix covers the first prompt and its output");
    const [reference] = await run(cold2, [follow]);
    assert.equal(again.ids.join(), reference.ids.join(), "the same tokens as a cold prefill");
    // The same prompt three times at once (n = 3): one prefill, the others fork from it.
    const three = await run(warm2, [ids.slice(5, 35), ids.slice(5, 35), ids.slice(5, 35)]);
    assert.deepEqual(three.map((t) => t.cachedTokens), [0, 30, 30]);
    assert.ok(three.every((t) => t.ids.join() === three[0].ids.join()), "greedy: the same text");
    await s.release();
  },
});

Deno.test({
  name: "n > 1 over HTTP: one prefill, n choices decoded as a batch, each as its own seeded request would be",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const server = await startServer(["--device", "wasm"]);
    await server.ready;
    try {
      const prompt = "def parse(line):\n    ";
      const three = await post(server.base, "/v1/completions", { prompt, max_tokens: 12, n: 3, seed: 40 });
      assert.equal(three.status, 200);
      const body = await three.json();
      assert.deepEqual(body.choices.map((c: { index: number }) => c.index), [0, 1, 2]);
      assert.equal(body.usage.completion_tokens, 36);
      assert.equal(body.usage.prompt_tokens, body.usage.total_tokens - 36, "the prompt counts once");
      const alone = await post(server.base, "/v1/completions", { prompt, max_tokens: 12, seed: 41 });
      assert.equal(
        (await alone.json()).choices[0].text,
        body.choices[1].text,
        "choice 1 samples with seed + 1",
      );
      const metrics = await (await fetch(`${server.base}/metrics`)).text();
      assert.ok(
        Number(metrics.match(/^fusedge_prefix_cache_hits_total (\d+)$/m)![1]) >= 2,
        "two choices reused the prefill",
      );

      const streamed = await readSse(
        await post(server.base, "/v1/completions", {
          prompt: "x = [",
          max_tokens: 6,
          n: 2,
          temperature: 0,
          stream: true,
        }),
      );
      assert.ok(streamed.done);
      const indices = new Set(
        streamed.events.flatMap((e) => (e.choices as { index: number }[]).map((c) => c.index)),
      );
      assert.deepEqual([...indices].sort(), [0, 1]);
      const last = streamed.events.at(-1)!;
      assert.equal((last.choices as unknown[]).length, 2);
      assert.equal((last.usage as { completion_tokens: number }).completion_tokens, 12);

      const bad = await post(server.base, "/v1/completions", { prompt, n: 9 });
      assert.equal(bad.status, 400);
      assert.equal((await bad.json()).error.param, "n");
    } finally {
      await server.stop();
    }
  },
});

Deno.test({
  name: "chunked prefill: a running stream gets a decode step between every two chunks of a long prompt",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const { assets, inst, engine } = await unfusedEngine();
    const ids = assets.tokenizer.encode(await Deno.readTextFile(EVAL_TEXT));
    let streamed = 0;
    let duringPrefill = -1;
    const long = ids.slice(100, 1000);
    let prefilled: Promise<void> | null = null;
    const running = new Promise<void>((resolve, reject) =>
      engine.submit(1, ids.slice(0, 8), params(60), {
        chunk: () => {
          streamed++;
          if (streamed === 3) {
            const before = streamed;
            prefilled = new Promise<void>((done) =>
              engine.submit(2, long, params(1), {
                chunk: () => (duringPrefill = streamed - before),
                done: () => done(),
                failed: reject,
              })
            );
          }
        },
        done: () => resolve(),
        failed: reject,
      })
    );
    await running;
    await prefilled;
    // At most a chunk a turn (less while the stream decodes: turnPrefillMs), so the stream gets a
    // step between every two chunks, unless it ends first.
    const chunks = Math.ceil(long.length / PREFILL_CHUNK);
    assert.ok(
      duringPrefill >= Math.min(chunks - 1, 60 - 3),
      `${duringPrefill} tokens streamed while ${long.length} prompt tokens were prefilled in ${chunks} chunks`,
    );
    await inst.release();
  },
});

onHostDevices(
  (device) =>
    `batched prefill (${device}): rows of different lengths and cached prefixes give each prompt's own logits and cache (1e-5)`,
  async ({ assets, s, ids }) => {
    const vocab = assets.checkpoint.config.vocabSize;
    const close = (got: Float32Array, want: Float32Array, what: string) => {
      const scale = Math.max(...want.map(Math.abs));
      const err = Math.max(...got.map((v, i) => Math.abs(v - want[i]))) / scale;
      assert.ok(err < 1e-5, `${what}: relative error ${err}`);
    };
    // Row 1 continues a prompt whose first 30 tokens are cached; rows 0 and 2 start from nothing.
    const prefix = await s.step(ids.slice(100, 130), s.emptyCache(), "last");
    const rows = [ids.slice(0, 9), ids.slice(130, 134), ids.slice(200, 201)];
    const r = await s.prefillRows([
      { ids: rows[0], from: null },
      { ids: rows[1], from: { cache: asBatch(prefix.cache), row: 0 } },
      { ids: rows[2], from: null },
    ], "last");
    assert.deepEqual(r.cache.lengths, [9, 34, 1]);
    const alone = [
      await s.step(rows[0], s.emptyCache(), "last"),
      await s.step(ids.slice(100, 134), s.emptyCache(), "last"),
      await s.step(rows[2], s.emptyCache(), "last"),
    ];
    alone.forEach((a, b) => close(r.logits.subarray(b * vocab, (b + 1) * vocab), a.logits, `row ${b}`));
    // The caches: a decode step from the run's rows gives each prompt's next logits alone.
    const next = [ids[9], ids[134], ids[201]];
    const step = await s.decodeBatch(next, r.cache);
    for (const [b, a] of alone.entries()) {
      const own = await s.step([next[b]], a.cache, "last");
      close(step.logits.subarray(b * vocab, (b + 1) * vocab), own.logits, `row ${b}'s next step`);
    }
    // Every position's logits, row after row, where the run asks for them all.
    const all = await s.prefillRows(
      rows.map((ids) => ({ ids, from: null })).filter((_, b) => b !== 1),
      "all",
    );
    assert.equal(all.logits.length, (9 + 1) * vocab);
    const whole = await s.logitsOf(rows[0]);
    close(all.logits.subarray(0, 9 * vocab), whole, "row 0, every position");
  },
);

onHostDevices(
  (device) =>
    `batched prefill (${device}): short prompts arriving together run as one prefill, a long one's first chunk cut to their width, each decoding what it decodes alone`,
  async ({ assets, inst, s, ids }) => {
    const cfg = assets.checkpoint.config;
    // Seven prompts of 7-8 tokens and one of 40, greedy and sampled.
    const reqs = Array.from({ length: 8 }, (_, i) => ({
      prompt: ids.slice(i * 50, i * 50 + (i === 3 ? 40 : 7 + (i % 2))),
      params: params(5 + i, i % 3 === 2 ? { temperature: 0.8, seed: i } : {}),
    }));
    const alone: number[][] = [];
    for (const r of reqs) alone.push((await runAll(inst.engine, [r]))[0].ids);
    const { prompts } = traceRuns(s);
    const engine = new BatchEngine(
      s,
      assets.tokenizer,
      cfg.eosTokenIds,
      cfg.maxPositions,
      () => {},
      0,
      8,
    );
    const together = await runAll(engine, reqs);
    together.forEach((t, i) => assert.deepEqual(t.ids, alone[i], `request ${i}`));
    assert.equal(prompts[0], 8, `the first run took every prompt: ${prompts.join(",")}`);
    assert.ok(
      prompts.length >= 2 && prompts.slice(1).every((n) => n === 1),
      `then the long prompt's rest alone: ${prompts.join(",")}`,
    );
    assert.ok(engine.peakRows >= 7, `they decoded together (peak ${engine.peakRows})`);

    // Prompts that all end in one run start the batch as that run's cache: no copy.
    const seen: { run?: unknown; step?: unknown } = {};
    const prefill = s.prefillRows.bind(s);
    s.prefillRows = async (...a) => {
      const r = await prefill(...a);
      seen.run ??= r.cache.tensors.values().next().value?.data;
      return r;
    };
    const decode = s.decodeBatch.bind(s);
    s.decodeBatch = (...a) => {
      seen.step ??= a[1].tensors.values().next().value?.data;
      return decode(...a);
    };
    const three = await runAll(engine, [0, 1, 2].map((i) => reqs[i]));
    three.forEach((t, i) => assert.deepEqual(t.ids, alone[i], `request ${i} again`));
    assert.ok(
      seen.run !== undefined && seen.step === seen.run,
      "the first step decoded in the run's own cache",
    );
  },
);

for (const device of ["wasm", "cpu"] as const) {
  Deno.test({
    name:
      `in-graph sampling (${device}): a step's exponentials are the softmax of its rows over their temperatures, and the engine draws from them what it draws from the logits`,
    ignore: device === "cpu" && !HAS_NATIVE,
    sanitizeResources: false,
    sanitizeOps: false,
    fn: async () => {
      const assets = await loadAssets(TINY_NAS);
      const cfg = assets.checkpoint.config;
      const vocab = cfg.vocabSize;
      assert.ok(!samplesInGraph(device, vocab), "tiny-nas' 4096 tokens are drawn in JS when served");
      assert.ok(samplesInGraph(device, 128256), "a 128K vocabulary's softmax is the graph's");
      // Built with the softmax whatever the vocabulary, so that the small model checks it.
      const graph = buildDecoderGraph(
        assets.checkpoint,
        applyPlan(assets.blocks, UNFUSED),
        FLOAT_WEIGHTS,
        undefined,
        {
          attention: attentionFor(device, "fp32"),
          sampling: true,
        },
      );
      const s = await ModelSession.create(graph, device, vocab);
      const engine = new BatchEngine(s, assets.tokenizer, cfg.eosTokenIds, cfg.maxPositions);
      const inst = { engine, release: () => s.release() };
      const ids = assets.tokenizer.encode(await Deno.readTextFile(EVAL_TEXT));
      try {
        assert.ok(s.graph.sampling, "the graph computes the softmax");
        const r = await s.prefillRows(
          [0, 1, 2].map((b) => ({ ids: ids.slice(b * 20, b * 20 + 12), from: null })),
          "last",
        );
        const step = await s.decodeBatch([ids[12], ids[32], ids[52]], r.cache, Infinity, {
          rows: [0, 2],
          inverseTemperature: [1 / 0.7, 1 / 1.3],
          logits: true,
        });
        for (const [k, [b, t]] of [[0, 0.7], [2, 1.3]].entries()) {
          const row = step.logits.subarray(b * vocab, (b + 1) * vocab);
          const max = Math.max(...row);
          const e = Array.from(row, (l) => Math.exp((l - max) / t));
          const sum = e.reduce((x, y) => x + y);
          const got = step.probs!.subarray(k * vocab, (k + 1) * vocab);
          // Relative to the likeliest token's probability: fp32 exponentials of fp32 products.
          const err = Math.max(...e.map((x, i) => Math.abs(got[i] - x / sum))) * sum;
          assert.ok(err < 1e-5, `row ${b}: largest difference ${err} of the likeliest's probability`);
        }
        const noLogits = await s.decodeBatch([ids[13], ids[33], ids[53]], step.cache, Infinity, {
          rows: [0, 1, 2],
          inverseTemperature: [1, 1, 1],
          logits: false,
        });
        assert.equal(noLogits.logits.length, 0, "no row reads logits: none fetched");
        assert.equal(noLogits.probs!.length, 3 * vocab);

        // A request asking for logprobs draws on the host from its logits; without, from the graph's
        // exponentials: the same seed, the same tokens.
        const sampled = (logprobs?: number) =>
          params(24, { temperature: 0.9, seed: 5, ...(logprobs ? { logprobs } : {}) });
        const prompt = ids.slice(300, 320);
        const [host, graph] = [
          await runAll(inst.engine, [{ prompt, params: sampled(1) }]),
          await runAll(inst.engine, [{ prompt, params: sampled() }]),
        ];
        assert.deepEqual(graph[0].ids, host[0].ids);
        assert.ok(new Set(graph[0].ids).size > 5, "the draws vary");
      } finally {
        await inst.release();
      }
    },
  });
}

Deno.test("batch engine: a prefill run of several prompts holds at most a quarter of padding", () => {
  assert.ok(runFits([{ tokens: 8 }, { tokens: 7 }, { tokens: 8 }], 128), "1 of 24 positions padding");
  assert.ok(!runFits([{ tokens: 40 }, { tokens: 7 }], 128), "33 of 80 padding");
  assert.ok(runFits([{ tokens: 8 }, { tokens: 7 }, { tokens: 6 }, { tokens: 8 }], 128), "3 of 32");
  assert.ok(!runFits([{ tokens: 8 }, { tokens: 8 }], 15), "over the run's positions");
  assert.ok(runFits([{ tokens: 128 }], 128), "one chunk alone");
  // The positions a run of several rows may hold shrink by a row of logits each (WASM's integer path at 1B).
  const oneB = { position: 2 * 64 * 8192 * 4, logits: 2 * 8 * 128256 * 4 };
  assert.equal(prefillLimit(oneB, false, 4), 8, "64 MB less four rows of logits, over 4.2 MB a position");
});

Deno.test("batch engine: a prefill run is cut where each position holds much memory (WASM's integer path at 1B)", () => {
  assert.equal(prefillLimit({ position: 0, logits: 0 }, true), PREFILL_CHUNK, "float graphs: whole chunks");
  // The 1B shape's integer path: 4.2 MB of block sums a position, 8.2 MB a row of logits (the 128K head).
  const oneB = { position: 2 * 64 * 8192 * 4, logits: 2 * 8 * 128256 * 4 };
  assert.equal(prefillLimit(oneB, false), 14, "64 MB less the one logits row, over 4.2 MB a position");
  assert.equal(prefillLimit(oneB, true), 5, "prompt logprobs: every position computes the head too");
  assert.equal(prefillLimit({ position: 1 << 30, logits: 0 }, false), 1, "at least one token a run");
  // tiny-nas on the integer path: its widest linear holds 48 KB a position, so whole chunks still.
  assert.equal(prefillLimit({ position: 2 * 8 * 768 * 4, logits: 2 * 8 * 4096 * 4 }, true), PREFILL_CHUNK);
});

Deno.test("batch engine: while rows decode, a turn prefills for about 40 ms or one decode step", () => {
  assert.equal(turnPrefillMs(false, 3), Infinity, "nothing decodes: a whole chunk, however long");
  assert.equal(turnPrefillMs(true, 3), PREFILL_TURN_MS);
  assert.equal(turnPrefillMs(true, 400), 400, "a 1B model on WASM: a step's worth, not 40 ms's");
  assert.equal(runPrefillTokens(0, 40), PREFILL_CHUNK, "nothing measured yet");
  assert.equal(runPrefillTokens(5, Infinity), PREFILL_CHUNK, "no limit");
  assert.equal(runPrefillTokens(1, 40), 40, "1 ms a token, 40 ms left");
  assert.equal(runPrefillTokens(0.1, 40), PREFILL_CHUNK, "never more than a chunk");
  assert.equal(runPrefillTokens(50, 400), 8);
  assert.equal(runPrefillTokens(500, 20), 1, "at least one token a run");
  assert.equal(runPrefillTokens(1, -5), 1, "the turn's first run when the step used it up");
});

/**
 * Logs the session's prefill runs and decode steps in order (`order`): "p" a prefill run, "d" a decode
 * step, and "P" a run of one one-token prompt from an empty cache, slowed by `delayMs` (as a run over a
 * long cached prefix costs, whatever its tokens); each decode step's rows (`rows`) and each prefill
 * run's (`prompts`).
 */
function traceRuns(s: ModelSession, delayMs = 0): { order: string[]; rows: number[]; prompts: number[] } {
  const trace = { order: [] as string[], rows: [] as number[], prompts: [] as number[] };
  const prefill = s.prefillRows.bind(s);
  const decode = s.decodeBatch.bind(s);
  s.prefillRows = async (...a: Parameters<ModelSession["prefillRows"]>) => {
    const [rows] = a;
    const slow = delayMs > 0 && rows.length === 1 && rows[0].ids.length === 1 && rows[0].from === null;
    trace.order.push(slow ? "P" : "p");
    trace.prompts.push(rows.length);
    if (slow) await new Promise((r) => setTimeout(r, delayMs));
    return await prefill(...a);
  };
  s.decodeBatch = (...a: Parameters<ModelSession["decodeBatch"]>) => {
    trace.order.push("d");
    trace.rows.push(a[0].length);
    return decode(...a);
  };
  return trace;
}

Deno.test({
  name: "fork: the n choices of one prompt run its prefill once and draw their first tokens from its logits",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const { assets, inst, engine } = await unfusedEngine();
    const ids = assets.tokenizer.encode(await Deno.readTextFile(EVAL_TEXT));
    const prompt = ids.slice(200, 240);
    const sampled = (seed: number) => params(6, { temperature: 0.9, seed });
    // Each choice alone, from a cold prefill of its own.
    const alone = [];
    for (const seed of [7, 8, 9]) alone.push((await runAll(engine, [{ prompt, params: sampled(seed) }]))[0]);
    const { order } = traceRuns(inst.session!);
    const three = await runAll(engine, [7, 8, 9].map((seed) => ({ prompt, params: sampled(seed) })));
    assert.equal(
      order.filter((r) => r === "p").length,
      1,
      `one prefill run for the three: ${order.join("")}`,
    );
    assert.deepEqual(
      three.map((t) => t.cachedTokens),
      [0, 40, 40],
      "the forks' prompts came from the first's cache",
    );
    assert.deepEqual(three.map((t) => t.ids), alone.map((t) => t.ids), "each draws what it draws alone");
    assert.ok(new Set(three.map((t) => t.ids.join())).size > 1, "the seeds differ, so do the draws");
    await inst.release();
  },
});

Deno.test({
  name:
    "slots: a step decodes at most `slots` rows, the n choices of a prompt included; the rest wait their turn",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const built = await unfusedEngine();
    const { assets, inst, engine: unlimited } = built;
    const s = inst.session!;
    const ids = assets.tokenizer.encode(await Deno.readTextFile(EVAL_TEXT));
    const prompts = [
      ids.slice(0, 20),
      ids.slice(40, 52),
      ...Array(5).fill(ids.slice(100, 130)),
      ids.slice(200, 203),
    ];
    const reqs = prompts.map((prompt) => ({ prompt, params: params(6) }));
    const want = await runAll(unlimited, reqs);
    const { rows } = traceRuns(s);
    const slotted = budgetedEngine(built, 2 ** 26, 3);
    const got = await runAll(slotted, reqs);
    assert.equal(Math.max(...rows), 3, `rows a step: ${rows.join(",")}`);
    assert.deepEqual(got.map((g) => g.ids), want.map((w) => w.ids), "greedy: what each decodes unlimited");
    // The room a batch keeps for 8 rows is memory only once written: under a 1 MB budget (170 tokens
    // of tiny-nas' KV) a finished prompt is still kept beside a batch that could hold 4 rows of 36.
    const tight = budgetedEngine(built, 2 ** 20, 8);
    const [, again] = [await runAll(tight, [reqs[4]]), await runAll(tight, [reqs[4]])];
    assert.equal(again[0].cachedTokens, 29, "the prompt's prefix came from the kept cache");
    await inst.release();
  },
});

Deno.test({
  name:
    "prefix cache: kept prefixes hold at most their own cap of a larger budget, the least recently used out",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const built = await unfusedEngine();
    const { assets, inst, engine: probe } = built;
    const ids = assets.tokenizer.encode(await Deno.readTextFile(EVAL_TEXT));
    const [a, b] = [ids.slice(0, 30), ids.slice(300, 330)];
    // Room for one finished 30 + 6-token sequence, not two, within a budget that holds dozens.
    const cap = 50 * probe.bytesPerToken;
    const engine = budgetedEngine(built, 2 ** 24, 8, cap);
    const run = async (prompt: number[]) => (await runAll(engine, [{ prompt, params: params(6) }]))[0];
    assert.equal((await run(a)).cachedTokens, 0);
    assert.equal((await run(a)).cachedTokens, 29, "a was kept");
    assert.equal((await run(b)).cachedTokens, 0);
    assert.equal((await run(a)).cachedTokens, 0, "a was dropped for b");
    assert.equal((await run(b)).cachedTokens, 0, "b was dropped for a");
    // A cap of 0 keeps nothing, yet a prompt still forks from a live row (the same prompt n times).
    const none = budgetedEngine(built, 2 ** 24, 8, 0);
    for (let i = 0; i < 2; i++) {
      assert.equal(
        (await runAll(none, [{ prompt: a, params: params(6) }]))[0].cachedTokens,
        0,
        "nothing kept",
      );
    }
    const twice = await runAll(none, [a, a].map((prompt) => ({ prompt, params: params(6) })));
    assert.deepEqual(twice.map((t) => t.cachedTokens), [0, 30]);
    await inst.release();
  },
});

Deno.test({
  name:
    "chunked prefill: while a stream decodes, a turn's prefill runs end on the clock, however few tokens they took",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const { assets, inst, engine } = await unfusedEngine();
    const ids = assets.tokenizer.encode(await Deno.readTextFile(EVAL_TEXT));
    // One-token prompts cost 60 ms a run, after a 130-token prompt made a token look cheap.
    const runs = traceRuns(inst.session!, 60).order;
    let streamed = 0;
    let waiting: Promise<unknown> = Promise.resolve();
    await new Promise<void>((resolve, reject) =>
      engine.submit(100, ids.slice(0, 8), params(40), {
        chunk: () => {
          if (++streamed !== 3) return;
          waiting = runAll(
            engine,
            // Prompts asking for their logprobs run one a run (short prompts share runs otherwise).
            [ids.slice(300, 430), ...ids.slice(500, 508).map((id) => [id])].map((prompt) => ({
              prompt,
              params: params(1, { promptLogprobs: true }),
            })),
          );
        },
        done: () => resolve(),
        failed: reject,
      })
    );
    await waiting;
    const order = runs.join("");
    // The turns between two of the stream's steps.
    const between = order.slice(order.indexOf("d"), order.lastIndexOf("d")).split("d");
    const slow = between.map((t) => t.replaceAll("p", "").length);
    assert.equal(
      slow.reduce((a, b) => a + b, 0),
      8,
      `the one-token prompts ran while the stream decoded: ${order}`,
    );
    assert.ok(Math.max(...slow) === 1, `one slow run a turn: ${order}`);
    await inst.release();
  },
});

Deno.test({
  name:
    "KV memory: an idle engine holds no host KV buffer but its kept prefixes'; those outgrown, redrawn or done with are freed, not left to the collector",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const built = await unfusedEngine();
    const { assets, inst } = built;
    const s = inst.session!;
    const ids = assets.tokenizer.encode(await Deno.readTextFile(EVAL_TEXT));
    // Every cache a session call hands the engine, by its buffer.
    const made: ArrayBufferLike[] = [];
    const note = <T extends { cache: BatchCache | null }>(r: T): T => {
      const b = r.cache && bufferOf(r.cache);
      if (b) made.push(b);
      return r;
    };
    const [prefill, regroup, decode, pack] = [s.prefillRows, s.regroupRows, s.decodeBatch, s.packRows].map((
      f,
    ) => f.bind(s)) as [typeof s.prefillRows, typeof s.regroupRows, typeof s.decodeBatch, typeof s.packRows];
    s.prefillRows = async (...a) => note(await prefill(...a));
    s.regroupRows = async (...a) => note(await regroup(...a));
    s.decodeBatch = async (...a) => note(await decode(...a));
    s.packRows = async (...a) => note({ cache: await pack(...a) }).cache!;
    const engine = budgetedEngine(built, 2 ** 24, 4);
    // More prompts than the 4 slots, so rows join and leave: one prefilled in chunks, one answered by
    // its prefill, the same prompt twice (a fork); then a prompt that reuses a kept prefix.
    const prompts = [
      ids.slice(0, 6),
      ids.slice(100, 400),
      ids.slice(500, 520),
      ids.slice(600, 610),
      ids.slice(600, 610),
      ids.slice(0, 4),
    ];
    const lengths = [70, 5, 1, 12, 12, 40];
    await runAll(engine, prompts.map((prompt, i) => ({ prompt, params: params(lengths[i]) })));
    await engine.idle();
    const reused = await runAll(engine, [{ prompt: ids.slice(500, 530), params: params(3) }]);
    assert.ok(reused[0].cachedTokens >= 19, "a kept prefix was reused");
    // Answered, the last rows leave the batch at the engine's next turn.
    await engine.idle();
    const kept = (engine as unknown as { kept: { cache: BatchCache }[] }).kept.map((k) => bufferOf(k.cache));
    assert.ok(kept.length > 0);
    const left = [...new Set(made)].filter((b) => !(b as ArrayBuffer).detached && !kept.includes(b));
    assert.ok(made.length > 10, `${made.length} caches made`);
    assert.equal(
      left.length,
      0,
      `${left.length} of ${new Set(made).size} caches' buffers left to the collector`,
    );
    await inst.release();
  },
});

Deno.test({
  name: "prefix reuse: the n choices of one prompt leave one kept prefix, not n copies",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const assets = await loadAssets(TINY_NAS);
    const inst = await buildInstance(assets, UNFUSED, "wasm");
    const s = inst.session!;
    const cfg = assets.checkpoint.config;
    try {
      const ids = assets.tokenizer.encode(await Deno.readTextFile(EVAL_TEXT)).slice(0, 200);
      const engine = new BatchEngine(
        s,
        assets.tokenizer,
        cfg.eosTokenIds,
        cfg.maxPositions,
        () => {},
        2 ** 26,
      );
      const prompt = ids.slice(0, 150);
      // Four sampled choices of 6 tokens: each finished one adds 6 tokens to the first one kept.
      await runAll(
        engine,
        [0, 1, 2, 3].map((i) => ({ prompt, params: params(6, { temperature: 1, seed: i }) })),
      );
      await engine.idle();
      const kept = engine.kvBytes / engine.bytesPerToken;
      assert.ok(kept >= 150 && kept <= 156, `one prefix of the prompt and a choice kept: ${kept} tokens`);
      // A different conversation is kept beside it.
      await runAll(engine, [{ prompt: ids.slice(100, 180), params: params(6) }]);
      await engine.idle();
      const more = engine.kvBytes / engine.bytesPerToken - kept;
      assert.ok(more >= 80 && more <= 86, `the other conversation kept beside it: ${more} tokens`);
    } finally {
      await inst.release();
    }
  },
});

Deno.test("batch engine: joiners are taken shortest first within a copy budget, all where the batch is redrawn", () => {
  // tiny-nas: 6144 bytes a token, so 8 MB is 1365 positions.
  const perToken = 6144;
  const room = { rows: 2, width: 900, capacity: 16 };
  assert.equal(JOIN_COPY_BYTES / perToken > 1300, true);
  assert.equal(
    joinersTaken([43, 800, 800, 800], perToken, room),
    2,
    "a stream and one long row fit the budget",
  );
  assert.equal(joinersTaken([1500, 1600], perToken, { ...room, width: 2000 }), 1, "at least one");
  assert.equal(joinersTaken([43, 800, 800], perToken, null), 2, "a new batch too: the rest append later");
  assert.equal(
    joinersTaken([43, 800, 800], perToken, { ...room, width: 500 }),
    3,
    "wider than the rows: all",
  );
  assert.equal(joinersTaken([10, 10, 10], perToken, { ...room, capacity: 3 }), 3, "no room: all");
});
