import assert from "node:assert/strict";
import { BatchEngine, PREFILL_CHUNK } from "../src/runtime/batch_engine.ts";
import { buildInstance, loadAssets } from "../src/runtime/engine.ts";
import { generate, type GenerateParams, type GenerationSummary } from "../src/runtime/generate.ts";
import { DEFAULT_SAMPLING } from "../src/runtime/sampling.ts";
import { type FusionPlan, UNFUSED } from "../src/fusion/plan.ts";
import { EVAL_TEXT, TINY_LLAMA, TINY_NAS } from "./helpers.ts";
import { post, startServer } from "./server_helpers.ts";

const params = (maxTokens: number, extra: Partial<GenerateParams> = {}): GenerateParams => ({
  ...DEFAULT_SAMPLING,
  maxTokens,
  stop: [],
  ignoreEos: true,
  ...extra,
});

/** Runs every request through one engine at once; resolves with each one's summary and streamed text. */
function runAll(engine: BatchEngine, reqs: { prompt: number[]; params: GenerateParams }[]) {
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

const CASES: [string, string, FusionPlan][] = [
  ["tiny-nas, fused", TINY_NAS, { version: 1, ffn_groups: [[3, 4, 5]] }],
  ["tiny-llama, unfused", TINY_LLAMA, UNFUSED],
];
for (const [name, dir, plan] of CASES) {
  Deno.test({
    name:
      `batched decode (${name}): 16 sequences of different lengths decode as one batch, each as it would alone`,
    sanitizeResources: false,
    sanitizeOps: false,
    fn: async () => {
      const assets = await loadAssets(dir);
      const inst = await buildInstance(assets, plan, "wasm");
      const cfg = assets.checkpoint.config;
      const text = await Deno.readTextFile(EVAL_TEXT);
      const ids = assets.tokenizer.encode(text);
      // Prompt lengths from 1 token to more than two prefill chunks; max_tokens from 1 to 24.
      const reqs = Array.from({ length: 16 }, (_, i) => ({
        prompt: ids.slice(i * 37, i * 37 + [1, 5, 17, 40, 2 * PREFILL_CHUNK + 30][i % 5]),
        params: params(1 + ((i * 7) % 24), i % 4 === 3 ? { temperature: 0.8, topK: 20, seed: 1000 + i } : {}),
      }));
      const alone: string[] = [];
      for (const r of reqs) {
        const it = generate({
          session: inst.session,
          tokenizer: assets.tokenizer,
          promptIds: r.prompt,
          params: r.params,
          eosTokenIds: cfg.eosTokenIds,
          maxPositions: cfg.maxPositions,
        });
        let s = await it.next();
        while (!s.done) s = await it.next();
        alone.push(s.value.ids.join(","));
      }
      const engine = new BatchEngine(inst.session, assets.tokenizer, cfg.eosTokenIds, cfg.maxPositions);
      const together = await runAll(engine, reqs);
      together.forEach((s, i) => {
        assert.equal(s.ids.join(","), alone[i], `request ${i} (prompt ${reqs[i].prompt.length} tokens)`);
        assert.equal(s.completionTokens, reqs[i].params.maxTokens);
        assert.equal(s.streamed, s.text, "the streamed chunks add up to the text");
      });
      assert.ok(engine.peakRows >= 8, `the sequences really shared steps (peak batch ${engine.peakRows})`);
      assert.equal(engine.kvBytes, 0, "every cache freed");
      await inst.session.release();
    },
  });
}

Deno.test({
  name: "batched decode: cancel ends one sequence, the rest go on; a full context ends a row",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const assets = await loadAssets(TINY_NAS);
    const inst = await buildInstance(assets, UNFUSED, "wasm");
    const cfg = assets.checkpoint.config;
    const engine = new BatchEngine(inst.session, assets.tokenizer, cfg.eosTokenIds, 40);
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
    await inst.session.release();
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
      // The worker reports its KV bytes after the answers went out: give the last report a moment.
      let metrics = "";
      for (let i = 0; i < 100 && !/^fusedge_kv_cache_bytes 0$/m.test(metrics); i++) {
        metrics = await (await fetch(`${server.base}/metrics`)).text();
        await new Promise((r) => setTimeout(r, 20));
      }
      assert.match(metrics, /^fusedge_kv_cache_budget_bytes 1048576$/m);
      assert.match(metrics, /^fusedge_kv_cache_bytes 0$/m, "all freed once the requests are done");
      assert.match(metrics, /^fusedge_kv_cache_reserved_bytes 0$/m);
    } finally {
      await server.stop();
    }
  },
});
