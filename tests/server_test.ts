import assert from "node:assert/strict";
import { post, readSse, startServer } from "./server_helpers.ts";

Deno.test({
  name: "server: health while loading, streamed completion over a real socket, errors as 4xx JSON",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async (t) => {
    const server = await startServer(["--device", "wasm"]);
    const { base } = server;
    try {
      await t.step("GET /health is 503 while the model loads, 200 after", async () => {
        const early = await fetch(`${base}/health`);
        assert.equal(early.status, 503);
        assert.equal((await early.json()).status, "loading");
        await server.ready;
        const ok = await fetch(`${base}/health`);
        assert.equal(ok.status, 200);
        const health = await ok.json();
        assert.ok(health.weight_bytes > 30e6, "fp32 weights of tiny-nas");
        const kv = health.kv_cache;
        assert.ok(kv.budget_bytes > 0 && kv.budget_bytes <= 2 ** 30, `default KV budget ${kv.budget_bytes}`);
        assert.deepEqual(kv, {
          budget_bytes: kv.budget_bytes,
          reserved_bytes: 0,
          used_bytes: 0,
          free_bytes: kv.budget_bytes,
          prefix_cache_bytes: Math.min(kv.budget_bytes, 64 * 2 ** 20),
        });
        assert.deepEqual({ ...health, weight_bytes: 0, kv_cache: null }, {
          status: "ok",
          model: "tiny-nas",
          device: "wasm",
          plan: "unfused",
          dtype: "fp32",
          quantize: "none",
          weight_bytes: 0,
          active: 0,
          queued: 0,
          kv_cache: null,
        });
      });

      await t.step("GET /v1/models lists the embedded model", async () => {
        const body = await (await fetch(`${base}/v1/models`)).json();
        assert.equal(body.object, "list");
        assert.equal(body.data[0].id, "tiny-nas");
        assert.equal(body.data[0].dtype, "fp32");
        assert.equal(body.data[0].quantize, "none");
      });

      const prompt = "import os\nimport sys\n\ndef main(";
      let whole = "";
      await t.step("non-streamed completion returns text, finish_reason and usage", async () => {
        const res = await post(base, "/v1/completions", { prompt, max_tokens: 24, temperature: 0 });
        assert.equal(res.status, 200);
        assert.equal(res.headers.get("x-fusedge-plan"), "unfused");
        const body = await res.json();
        assert.equal(body.object, "text_completion");
        assert.equal(body.choices[0].finish_reason, "length");
        assert.deepEqual(body.usage, {
          prompt_tokens: 10,
          completion_tokens: 24,
          total_tokens: 34,
          prompt_tokens_details: { cached_tokens: 0 },
        });
        whole = body.choices[0].text;
        assert.ok(whole.length > 10);
      });

      await t.step(
        "stream: true gives SSE chunks as tokens are produced, usage last, then [DONE]",
        async () => {
          const res = await post(base, "/v1/completions", {
            prompt,
            max_tokens: 24,
            temperature: 0,
            stream: true,
          });
          assert.equal(res.status, 200);
          assert.match(res.headers.get("content-type") ?? "", /text\/event-stream/);
          const sse = await readSse(res);
          assert.ok(sse.done, "ends with data: [DONE]");
          assert.ok(sse.events.length >= 10, `${sse.events.length} events`);
          assert.equal(sse.text, whole, "streamed text equals the non-streamed completion");
          const last = sse.events.at(-1)!;
          assert.deepEqual(last.usage, {
            prompt_tokens: 10,
            completion_tokens: 24,
            total_tokens: 34,
            // The same prompt again: all but its last token come from the first request's cache.
            prompt_tokens_details: { cached_tokens: 9 },
          });
          assert.equal((last.choices as { finish_reason: string }[])[0].finish_reason, "length");
          assert.ok(
            sse.events.slice(0, -1).every((e) =>
              (e.choices as { finish_reason: null }[])[0].finish_reason === null
            ),
          );
          assert.ok(sse.arrivals[0] < sse.arrivals.at(-1)!, "chunks arrive over time, not in one write");
        },
      );

      await t.step("stop sequences and seeded sampling", async () => {
        const stopped = await (await post(base, "/v1/completions", {
          prompt,
          max_tokens: 24,
          temperature: 0,
          stop: ["\n"],
        })).json();
        assert.equal(stopped.choices[0].finish_reason, "stop");
        assert.equal(stopped.choices[0].text, whole.split("\n")[0]);
        const req = { prompt, max_tokens: 16, temperature: 0.9, top_k: 40, top_p: 0.95, seed: 1234 };
        const a = await (await post(base, "/v1/completions", req)).json();
        const b = await (await post(base, "/v1/completions", req)).json();
        assert.equal(a.choices[0].text, b.choices[0].text);
      });

      await t.step(
        "several prompts: each is completed n times, in prompt order, streamed or whole",
        async () => {
          const other = "import os\n";
          const one = async (p: string) =>
            (await (await post(base, "/v1/completions", { prompt: p, max_tokens: 8, temperature: 0 })).json())
              .choices[0].text;
          const req = { prompt: [prompt, other], n: 2, max_tokens: 8, temperature: 0 };
          const body = await (await post(base, "/v1/completions", req)).json();
          assert.deepEqual(body.choices.map((c: { index: number }) => c.index), [0, 1, 2, 3]);
          const texts = body.choices.map((c: { text: string }) => c.text);
          const [a, b] = [await one(prompt), await one(other)];
          assert.deepEqual(texts, [a, a, b, b]);
          const otherTokens = (await (await post(base, "/tokenize", { prompt: other })).json()).count;
          assert.equal(body.usage.prompt_tokens, 10 + otherTokens);
          assert.equal(body.usage.completion_tokens, 32);
          // Token-id prompts, streamed: each choice's pieces join to its whole answer.
          const ids = [
            (await (await post(base, "/tokenize", { prompt })).json()).tokens,
            (await (await post(base, "/tokenize", { prompt: other })).json()).tokens,
          ];
          const sse = await readSse(
            await post(base, "/v1/completions", { ...req, prompt: ids, stream: true }),
          );
          const streamed = ["", "", "", ""];
          for (const e of sse.events) {
            for (const c of e.choices as { index: number; text: string }[]) streamed[c.index] += c.text;
          }
          assert.deepEqual(streamed, texts);
          // echo with logprobs: each choice starts with its own prompt, its offsets from that prompt.
          const echoed = await (await post(base, "/v1/completions", {
            prompt: ["a b", "c d e"],
            echo: true,
            logprobs: 1,
            max_tokens: 2,
            temperature: 0,
          })).json();
          const [first, second] = echoed.choices;
          // A prompt's logprobs longer than one message's part (128 positions) arrive whole and in order.
          const long = "for i in range(10):\n    total += i * i\n".repeat(20);
          const longEcho = await (await post(base, "/v1/completions", {
            prompt: long,
            echo: true,
            logprobs: 0,
            max_tokens: 1,
          })).json();
          const longTokens = (await (await post(base, "/tokenize", { prompt: long })).json()).count;
          assert.ok(longTokens > 256, `${longTokens} tokens`);
          const lp = longEcho.choices[0].logprobs;
          assert.equal(lp.tokens.length, longTokens + 1);
          assert.equal(lp.tokens.slice(0, longTokens).join(""), long);
          assert.ok(lp.token_logprobs.slice(1).every((x: number) => x <= 0));
          // Text that String.replace would read as a pattern ($&, $') comes back as written.
          const dollars = await (await post(base, "/v1/completions", {
            prompt: "cost = $& + $' + $$",
            echo: true,
            max_tokens: 1,
          })).json();
          assert.ok(dollars.choices[0].text.startsWith("cost = $& + $' + $$"));
          assert.ok(first.text.startsWith("a b") && second.text.startsWith("c d e"));
          assert.equal(second.logprobs.tokens.slice(0, 3).join(""), "c d e");
          assert.equal(second.logprobs.token_logprobs[0], null);
          assert.equal(second.logprobs.text_offset[0], 0);
          for (
            const [bad, re, param] of [
              [{ prompt: ["a", "b", "c"], n: 3 }, /3 prompts x n=3 is 9 choices; at most 8/, "n"],
              [{ prompt: [] }, /prompt/, "prompt"],
              [{ prompt: [[1, 2], [99999]] }, /token id 99999 is out of range/, "prompt"],
            ] as const
          ) {
            const res = await post(base, "/v1/completions", bad);
            assert.equal(res.status, 400, JSON.stringify(bad));
            const err = (await res.json()).error;
            assert.match(err.message, re);
            assert.equal(err.param, param);
          }
        },
      );

      await t.step("malformed requests get 4xx with a JSON error naming the problem", async () => {
        const cases: [unknown, number, RegExp, boolean?][] = [
          ["{not json", 400, /not valid JSON/, true],
          [{}, 400, /prompt/],
          [{ prompt: 42 }, 400, /prompt/],
          [{ prompt: "x", max_tokens: 0 }, 400, /max_tokens/],
          [{ prompt: "x", max_tokens: 100000 }, 400, /max_tokens.*4096/],
          [{ prompt: "x", temperature: -1 }, 400, /temperature/],
          [{ prompt: "x", top_p: 0 }, 400, /top_p/],
          [{ prompt: "x", top_k: 1.5 }, 400, /top_k/],
          [{ prompt: "x", n: 9 }, 400, /n/],
          [{ prompt: "x", stop: ["a", "b", "c", "d", "e"] }, 400, /stop: .*<=4/],
          [{ prompt: "x", logprobs: 21 }, 400, /logprobs/],
          [{ prompt: "x", echo: "yes" }, 400, /echo/],
          [{ prompt: [1, 99999] }, 400, /token id 99999 is out of range/],
          [{ prompt: "x ".repeat(1100) }, 400, /context window is 1024/],
          [{ prompt: "x", presence_penalty: 3 }, 400, /presence_penalty/],
          [{ prompt: "x", model: "other" }, 404, /the model 'other' does not exist/],
        ];
        for (const [body, status, re, raw] of cases) {
          const res = await post(base, "/v1/completions", body, raw);
          assert.equal(res.status, status, JSON.stringify(body).slice(0, 80));
          const err = await res.json();
          assert.match(err.error.message, re);
        }
        // The frontier's plans come from an analysis; there is none yet.
        const noFrontier = await post(base, "/bench", { frontier: true });
        assert.equal(noFrontier.status, 400);
        assert.equal((await noFrontier.json()).error.param, "frontier");
        // Fields OpenAI does not know are ignored, as OpenAI ignores them.
        const extra = await post(base, "/v1/completions", { prompt: "x", max_tokens: 1, bogus: true });
        assert.equal(extra.status, 200);
        await extra.body?.cancel();
        // These tiny checkpoints ship no tokenizer_config.json: no chat template, and the 400 says what to do.
        const chat = await post(base, "/v1/chat/completions", {
          messages: [{ role: "user", content: "hi" }],
        });
        assert.equal(chat.status, 400);
        const chatErr = (await chat.json()).error;
        assert.equal(chatErr.param, "messages");
        assert.match(chatErr.message, /no chat template.*--chat-template/);
        const big = await post(base, "/v1/completions", { prompt: "x".repeat(2 << 20) });
        assert.equal(big.status, 413);
        assert.match((await big.json()).error.message, /exceeds/);
        const missing = await fetch(`${base}/nope`);
        assert.equal(missing.status, 404);
        await missing.body?.cancel();
        // A path the server has, with a method it does not take: 405 and what it does take.
        for (
          const [method, path, allow] of [
            ["DELETE", "/v1/completions", "POST, OPTIONS"],
            ["PUT", "/health", "GET, HEAD, OPTIONS"],
            ["POST", "/v1/models/tiny-nas", "GET, HEAD, OPTIONS"],
            ["PATCH", "/analysis", "GET, POST, DELETE, HEAD, OPTIONS"],
          ]
        ) {
          const res = await fetch(`${base}${path}`, { method });
          assert.equal(res.status, 405, `${method} ${path}`);
          assert.equal(res.headers.get("allow"), allow);
          assert.match((await res.json()).error.message, new RegExp(`${method} is not allowed on ${path}`));
        }
        // A preflight is answered, but with no CORS headers for an origin not allowed (none is, here).
        const preflight = await fetch(`${base}/v1/completions`, {
          method: "OPTIONS",
          headers: { origin: "http://elsewhere.example", "access-control-request-method": "POST" },
        });
        assert.equal(preflight.status, 204);
        assert.equal(preflight.headers.get("allow"), "POST, OPTIONS");
        assert.equal(preflight.headers.get("access-control-allow-origin"), null);
        await preflight.body?.cancel();
      });

      await t.step(
        "GET /v1/models/{id}, /tokenize, /detokenize, include_usage, OpenAI's penalties",
        async () => {
          const model = await (await fetch(`${base}/v1/models/tiny-nas`)).json();
          assert.equal(model.id, "tiny-nas");
          const unknown = await fetch(`${base}/v1/models/gpt-5`);
          assert.equal(unknown.status, 404);
          assert.match((await unknown.json()).error.message, /'gpt-5' does not exist/);
          const text = "def naïve(x):\n    return x  # ✓\n";
          const tok = await (await post(base, "/tokenize", { prompt: text })).json();
          assert.equal(tok.count, tok.tokens.length);
          assert.equal(tok.max_model_len, 1024);
          // Fields vLLM knows and these routes do not are ignored, as on every route.
          const special = await post(base, "/tokenize", { prompt: text, add_special_tokens: true });
          assert.deepEqual((await special.json()).tokens, tok.tokens);
          for (
            const [body, re] of [[{}, /prompt: give prompt or messages$/], [
              { prompt: "a", messages: [] },
              /not both|messages/,
            ]] as const
          ) {
            const res = await post(base, "/tokenize", body);
            assert.equal(res.status, 400);
            assert.match((await res.json()).error.message, re);
          }
          const detok = await (await post(base, "/detokenize", { tokens: tok.tokens })).json();
          assert.equal(detok.prompt, text);
          const bad = await post(base, "/detokenize", { tokens: [1, 99999] });
          assert.equal(bad.status, 400);
          assert.equal((await bad.json()).error.param, "tokens");
          const noTemplate = await post(base, "/tokenize", { messages: [{ role: "user", content: "hi" }] });
          assert.equal(noTemplate.status, 400);
          assert.equal((await noTemplate.json()).error.param, "messages");
          // Longer than the context times the longest token (1024 x 65 characters): refused before any work.
          const huge = await post(base, "/tokenize", { prompt: "x".repeat(66_561) });
          assert.equal(huge.status, 400);
          const hugeErr = (await huge.json()).error;
          assert.equal(hugeErr.param, "prompt");
          assert.match(hugeErr.message, /66561 characters is more than any prompt this model takes \(66560/);
          const sse = await readSse(
            await post(base, "/v1/completions", {
              prompt,
              max_tokens: 4,
              stream: true,
              stream_options: { include_usage: true },
              presence_penalty: 1.5,
              frequency_penalty: 0.5,
            }),
          );
          const last = sse.events.at(-1)!;
          assert.deepEqual(last.choices, [], "the usage chunk has no choices");
          assert.equal((last.usage as { completion_tokens: number }).completion_tokens, 4);
          const metrics = await (await fetch(`${base}/metrics`)).text();
          assert.match(metrics, /route="\/v1\/models\/:id"/, "the id never becomes a label");
        },
      );
    } finally {
      await server.stop();
    }
  },
});
