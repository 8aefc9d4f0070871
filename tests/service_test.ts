import assert from "node:assert/strict";
import { metric, readSse, startServer, waitFor } from "./server_helpers.ts";

const ADMIN = "admin-secret-123";
const KEY = "api-key-456789";

Deno.test({
  name: "service: auth, 429 with Retry-After, cancellation, timeouts, metrics, logs, memory across swaps",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async (t) => {
    const server = await startServer([
      "--device",
      "wasm",
      "--max-active",
      "1",
      "--max-queue",
      "1",
      "--request-timeout",
      "2",
      "--admin-token",
      ADMIN,
      "--api-key",
      KEY,
    ]);
    const { base } = server;
    const auth = { authorization: `Bearer ${KEY}`, "content-type": "application/json" };
    const complete = (body: unknown, headers: Record<string, string> = auth, signal?: AbortSignal) =>
      fetch(`${base}/v1/completions`, { method: "POST", headers, body: JSON.stringify(body), signal });
    await server.ready;
    try {
      await t.step(
        "completions need the API key; admin routes need the admin token, not the API key",
        async () => {
          const none = await complete({ prompt: "x", max_tokens: 1 }, { "content-type": "application/json" });
          assert.equal(none.status, 401);
          assert.match((await none.json()).error.message, /bearer token/);
          const wrong = await complete({ prompt: "x", max_tokens: 1 }, {
            ...auth,
            authorization: "Bearer nope",
          });
          assert.equal(wrong.status, 401);
          await wrong.body?.cancel();
          const ok = await complete({ prompt: "x", max_tokens: 1 });
          assert.equal(ok.status, 200);
          await ok.body?.cancel();
          for (const path of ["/fuse", "/bench", "/analysis"]) {
            const res = await fetch(`${base}${path}`, { method: "POST", headers: auth, body: "{}" });
            assert.equal(res.status, 401, path);
            await res.body?.cancel();
          }
          const fused = await fetch(`${base}/fuse`, {
            method: "POST",
            headers: { authorization: `Bearer ${ADMIN}`, "content-type": "application/json" },
            body: JSON.stringify({ ffn_groups: [[3, 4]] }),
          });
          assert.equal(fused.status, 200);
          await fused.body?.cancel();
          const open = await fetch(`${base}/fuse`);
          assert.equal(open.status, 200, "reads stay open");
          await open.body?.cancel();
        },
      );

      await t.step(
        "a full queue answers 429 with Retry-After; queued requests run when a slot frees",
        async () => {
          const long = complete({ prompt: "def main(", max_tokens: 300, temperature: 0, stream: true }).then(
            readSse,
          );
          await waitFor(async () => (await (await fetch(`${base}/health`)).json()).active === 1);
          const queued = complete({ prompt: "x", max_tokens: 2 });
          await waitFor(async () => (await (await fetch(`${base}/health`)).json()).queued === 1);
          const refused = await complete({ prompt: "x", max_tokens: 2 });
          assert.equal(refused.status, 429);
          assert.ok(Number(refused.headers.get("retry-after")) >= 1);
          assert.match((await refused.json()).error.message, /capacity/);
          assert.equal((await queued).status, 200);
          assert.ok((await long).done);
          const m = await (await fetch(`${base}/metrics`)).text();
          assert.match(m, /fusedge_http_requests_total\{.*status="429".*\} 1/);
          assert.equal(metric(m, "fusedge_rejected_total"), 1);
        },
      );

      await t.step("a client that disconnects stops its generation within a decode step", async () => {
        const abort = new AbortController();
        const res = await complete(
          { prompt: "def main(", max_tokens: 1000, temperature: 0, stream: true },
          auth,
          abort.signal,
        );
        const reader = res.body!.getReader();
        await reader.read();
        const m0 = await (await fetch(`${base}/metrics`)).text();
        const before = metric(m0, "fusedge_generated_tokens_total");
        const cancelledBefore = metric(m0, "fusedge_cancelled_total");
        abort.abort();
        const idle = await waitFor(
          async () => (await (await fetch(`${base}/health`)).json()).active === 0,
          1000,
        );
        assert.ok(idle, "the scheduler is idle right after the disconnect");
        const m = await (await fetch(`${base}/metrics`)).text();
        assert.equal(metric(m, "fusedge_cancelled_total"), cancelledBefore + 1);
        assert.ok(
          metric(m, "fusedge_generated_tokens_total") - before < 1000,
          "the generation did not run to max_tokens",
        );
      });

      await t.step("the wall-clock limit ends a generation that runs too long", async () => {
        const t0 = performance.now();
        const body =
          await (await complete({ prompt: "def main(", max_tokens: 4000, temperature: 0, stop: [] })).json();
        assert.ok(performance.now() - t0 < 4000);
        assert.ok(body.usage.completion_tokens < 4000);
        assert.equal(body.choices[0].finish_reason, "length");
      });

      await t.step(
        "/metrics speaks Prometheus: requests, tokens, latency histograms, queue, plan, swaps, load time",
        async () => {
          const m = await (await fetch(`${base}/metrics`)).text();
          for (
            const name of [
              "fusedge_http_requests_total",
              "fusedge_generated_tokens_total",
              "fusedge_time_to_first_token_seconds_bucket",
              "fusedge_inter_token_latency_seconds_count",
              "fusedge_queue_depth",
              "fusedge_active_generations",
              "fusedge_plan_swaps_total",
              "fusedge_plan_swap_seconds_count",
              "fusedge_model_load_seconds",
              "fusedge_process_resident_memory_bytes",
            ]
          ) assert.ok(!Number.isNaN(metric(m, name)), name);
          assert.match(m, /# TYPE fusedge_time_to_first_token_seconds histogram/);
          assert.match(m, /fusedge_active_plan\{plan="ffn\[3-4\]"\} 1/);
          assert.equal(metric(m, "fusedge_plan_swaps_total"), 1);
          assert.ok(metric(m, "fusedge_model_load_seconds") > 0);
          assert.match(
            m,
            /fusedge_http_requests_total\{route="\/v1\/completions",method="POST",status="200"\} \d+/,
          );
        },
      );

      await t.step("one structured log line per request, with the completion's numbers", async () => {
        const before = server.events.filter((e) => e.event === "request").length;
        await (await complete({ prompt: "x", max_tokens: 3, temperature: 0 })).body?.cancel();
        await (await fetch(`${base}/health`)).body?.cancel();
        await waitFor(() =>
          Promise.resolve(server.events.filter((e) => e.event === "request").length >= before + 2)
        );
        const logs = server.events.filter((e) => e.event === "request").slice(before);
        assert.equal(logs.length, 2);
        assert.equal(logs[0].path, "/v1/completions");
        assert.equal(logs[0].status, 200);
        assert.equal(logs[0].prompt_tokens, 1);
        assert.equal(logs[0].plan, "ffn[3-4]");
        assert.equal(typeof logs[0].ms, "number");
        assert.equal(logs[1].path, "/health");
      });

      await t.step("memory does not grow across repeated plan swaps", async () => {
        const swap = async (groups: number[][]) => {
          const res = await fetch(`${base}/fuse`, {
            method: "POST",
            headers: { authorization: `Bearer ${ADMIN}`, "content-type": "application/json" },
            body: JSON.stringify({ ffn_groups: groups }),
          });
          assert.equal(res.status, 200);
          await res.body?.cancel();
        };
        const rss = async () =>
          metric(await (await fetch(`${base}/metrics`)).text(), "fusedge_process_resident_memory_bytes");
        const plans = [[[3, 4, 5]], [[6, 7, 8]], [], [[2, 3, 4, 5, 6, 7, 8]]];
        for (const p of plans) await swap(p);
        const warm = await rss();
        for (let i = 0; i < 12; i++) await swap(plans[i % plans.length]);
        const after = await rss();
        // Every plan lives in a worker that is ended once retired, so one instance is left alive; RSS
        // moves by a few hundred MB with when V8 and the allocator hand memory back, while a leaked
        // instance (a worker with its own session and heap) would add well over 100 MB each.
        const m = await (await fetch(`${base}/metrics`)).text();
        assert.equal(metric(m, "fusedge_plan_instances"), 1);
        assert.ok(after - warm < 600e6, `rss grew by ${((after - warm) / 1e6).toFixed(0)} MB over 12 swaps`);
        assert.equal((await (await fetch(`${base}/fuse`)).json()).retiring, 0);
      });
    } finally {
      await server.stop();
    }
  },
});
