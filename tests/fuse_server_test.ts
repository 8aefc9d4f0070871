import assert from "node:assert/strict";
import { post, readSse, startServer, waitForJob } from "./server_helpers.ts";

Deno.test({
  name: "server: hot swap under load, plan validation, and analyses in the background",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async (t) => {
    const server = await startServer(["--device", "wasm"]);
    const { base } = server;
    await server.ready;
    const greedy = async () =>
      (await (await post(base, "/v1/completions", { prompt: "def main(", max_tokens: 12, temperature: 0 }))
        .json()).choices[0].text;
    try {
      const baseline = await greedy();
      await t.step(
        "concurrent streams survive two /fuse swaps; each is served by one plan; later requests use the new one",
        async () => {
          const prompts = [
            "import os\n",
            "def main(",
            "class Stack:\n",
            "for i in range(",
            "return self.",
            "while True:\n",
          ];
          const ends: number[] = [];
          const streams = prompts.map((prompt) =>
            post(base, "/v1/completions", {
              prompt,
              // Long enough to outlast two builds on a loaded 2-core machine, even now that the six decode
              // as one batch; within the 1024 context.
              max_tokens: 1000,
              temperature: 0.7,
              seed: 3,
              stream: true,
              stop: [],
            })
              .then(readSse)
              .then((r) => (ends.push(performance.now()), r))
          );
          await new Promise((r) => setTimeout(r, 150));
          const first = await post(base, "/fuse", { ffn_groups: [[3, 4, 5], [6, 7, 8]] });
          assert.equal(first.status, 200, await first.clone().text());
          assert.equal((await first.json()).active.id, "ffn[3-5,6-8]");
          const second = await post(base, "/fuse", { version: 1, ffn_groups: [[2, 3, 4, 5]] });
          assert.equal(second.status, 200);
          await second.body?.cancel();
          const swappedAt = performance.now();
          assert.equal(ends.length, 0, "both swaps landed while every stream was still in flight");
          const inFlight = await (await fetch(`${base}/fuse`)).json();
          assert.ok(inFlight.retiring >= 1, "the replaced session is kept alive for its streams");
          const results = await Promise.all(streams);
          assert.ok(ends.every((e) => e > swappedAt));
          for (const r of results) {
            assert.ok(r.done, "every stream ends with [DONE]");
            assert.ok(r.events.every((e) => !("error" in e)), "no stream errors");
            const last = r.events.at(-1)!;
            const finished = (last.choices as { finish_reason: string }[])[0].finish_reason;
            const tokens = (last.usage as { completion_tokens: number }).completion_tokens;
            assert.ok(tokens === 1000 || finished === "stop", `${tokens} tokens, ${finished}`);
            const plans = new Set(r.events.map((e) => e.plan));
            assert.deepEqual([...plans], ["unfused"], "a stream finishes on the session it started on");
          }
          const later = await post(base, "/v1/completions", { prompt: "x = ", max_tokens: 2 });
          assert.equal((await later.json()).plan, "ffn[2-5]");
          const state = await (await fetch(`${base}/fuse`)).json();
          assert.equal(state.active.id, "ffn[2-5]");
          assert.equal(state.swaps, 2);
          assert.equal(state.retiring, 0, "old sessions are freed once their streams end");
          assert.equal(state.active.ffn_blocks, 12 - 4 + 1);
        },
      );

      await t.step("bad plans are 400 with a precise message and the active plan stays", async () => {
        const bad: [unknown, RegExp][] = [
          [{ ffn_groups: [[8, 9]] }, /ffn_groups\[0\] \[8,9\]: layer 9 has attention/],
          [{ ffn_groups: [[3, 4], [4, 5]] }, /layer 4 is already in ffn_groups\[0\]/],
          [{ ffn_groups: [[11, 12]] }, /layer 12 is out of range/],
          [{ ffn_groups: [[3, 5]] }, /consecutive/],
          [{ groups: [] }, /groups/],
          ["nope", /invalid plan/],
        ];
        for (const [plan, re] of bad) {
          const res = await post(base, "/fuse", plan);
          assert.equal(res.status, 400, JSON.stringify(plan));
          assert.match((await res.json()).error.message, re);
        }
        const raw = await post(base, "/fuse", "{oops", true);
        assert.equal(raw.status, 400);
        await raw.body?.cancel();
        assert.equal((await (await fetch(`${base}/fuse`)).json()).active.id, "ffn[2-5]");
      });

      await t.step(
        "an empty plan returns to the unfused model, which reproduces the unfused greedy text",
        async () => {
          const back = await post(base, "/fuse", { ffn_groups: [] });
          assert.equal((await back.json()).active.id, "unfused");
          assert.equal(await greedy(), baseline);
        },
      );

      await t.step(
        "a swap converts only the groups it changes: bytes rebuilt and reused in /fuse and /metrics",
        async () => {
          // tiny-nas: hidden 256, FFN 768; a fused group of three is 3 fp32 matrices of 2304 x 256
          // and its unit RMS gain.
          const group = 3 * 3 * 768 * 256 * 4 + 256 * 4;
          const first = await (await post(base, "/fuse", { ffn_groups: [[3, 4, 5]] })).json();
          assert.equal(first.rebuilt_bytes, group, "only group 3-5 is built; every other weight is reused");
          const total = first.rebuilt_bytes + first.reused_bytes;
          const second = await (await post(base, "/fuse", { ffn_groups: [[3, 4, 5], [6, 7, 8]] })).json();
          assert.equal(second.rebuilt_bytes, group, "group 3-5 comes from the previous plan; 6-8 is new");
          // Fusing 6-8 trades their three RMS gains for one unit gain.
          assert.equal(second.rebuilt_bytes + second.reused_bytes, total - 2 * 256 * 4);
          const metrics = await (await fetch(`${base}/metrics`)).text();
          const value = (name: string) => Number(metrics.match(new RegExp(`^${name} (\\S+)$`, "m"))![1]);
          assert.ok(value("fusedge_plan_swap_rebuilt_bytes_total") >= 2 * group);
          assert.ok(
            value("fusedge_plan_swap_reused_bytes_total") >= first.reused_bytes + second.reused_bytes,
          );
          assert.ok(value("fusedge_weight_cache_bytes") >= total - 2 * 256 * 4);
        },
      );

      await t.step(
        "version 2 plans swap live: attention removed, FFNs fused across it, whole blocks in parallel",
        async () => {
          const plan = {
            version: 2,
            attention: { remove: [9] },
            ffn_groups: [[8, 9]],
            block_groups: [[10, 11]],
          };
          const swap = await post(base, "/fuse", plan);
          assert.equal(swap.status, 200, await swap.clone().text());
          const body = await swap.json();
          assert.equal(body.active.id, "-attn[9]+ffn[8-9]+blk[10-11]");
          assert.deepEqual(body.active.plan, { ...plan, attention: { remove: [9], linear: [] } });
          const res = await (await post(base, "/v1/completions", { prompt: "def f(", max_tokens: 6 })).json();
          assert.equal(res.plan, "-attn[9]+ffn[8-9]+blk[10-11]");
          assert.equal(res.usage.completion_tokens, 6);
          const refused = await post(base, "/fuse", { version: 2, ffn_groups: [[8, 9]] });
          assert.equal(refused.status, 400);
          assert.match((await refused.json()).error.message, /layer 9 has attention.*attention\.remove/);
          assert.equal(
            (await (await fetch(`${base}/fuse`)).json()).active.id,
            "-attn[9]+ffn[8-9]+blk[10-11]",
          );
          // A linear attention is fitted on the calibration text in the build worker, then served.
          const linear = await post(base, "/fuse", {
            version: 2,
            attention: { linear: [9, 10] },
            ffn_groups: [[8, 9, 10]],
          });
          assert.equal(linear.status, 200, await linear.clone().text());
          assert.equal((await linear.json()).active.id, "lin[9,10]+ffn[8-10]");
          const served = await (await post(base, "/v1/completions", { prompt: "x = ", max_tokens: 4 }))
            .json();
          assert.equal(served.plan, "lin[9,10]+ffn[8-10]");
          await (await post(base, "/fuse", { ffn_groups: [] })).body?.cancel();
        },
      );

      await t.step(
        "POST /analysis runs in a worker while completions keep being served; GET returns the report",
        async () => {
          const none = await fetch(`${base}/analysis`);
          assert.equal(none.status, 404);
          assert.match((await none.json()).error.message, /no analysis yet: POST runs one/);
          const bad = await post(base, "/analysis", { max_tokens: 1 });
          assert.equal(bad.status, 400);
          await bad.body?.cancel();
          const started = await post(base, "/analysis", { max_tokens: 48, window: 24 });
          assert.equal(started.status, 202);
          await started.body?.cancel();
          const busy = await post(base, "/analysis", {});
          assert.equal(busy.status, 409);
          await busy.body?.cancel();
          const during = await post(base, "/v1/completions", {
            prompt: "def f(",
            max_tokens: 4,
            temperature: 0,
          });
          assert.equal(during.status, 200);
          await during.body?.cancel();
          const body = await waitForJob(base, "/analysis");
          assert.equal(body.status, "done", JSON.stringify(body).slice(0, 300));
          const report = body.report;
          assert.equal(report.analysis.blocks.length, 18);
          assert.equal(report.analysis.tokens, 48);
          assert.deepEqual(report.runs, [[2, 3, 4, 5, 6, 7, 8]]);
          const applied = await post(base, "/fuse", report.suggested_plan);
          assert.equal(applied.status, 200, "the suggested plan is a valid plan");
          await applied.body?.cancel();
          const svg = await fetch(`${base}/analysis/heatmap.svg`);
          assert.equal(svg.headers.get("content-type"), "image/svg+xml");
          assert.match(await svg.text(), /^<svg[\s\S]*attn 0[\s\S]*<\/svg>$/);
          const noFrontier = await fetch(`${base}/analysis/frontier.svg`);
          assert.equal(noFrontier.status, 404, "an analysis without remove_steps has no frontier");
          assert.match((await noFrontier.json()).error.message, /remove_steps/);
        },
      );

      await t.step(
        "POST /analysis with remove_steps measures the frontier in the worker; its plan swaps in",
        async () => {
          const bad = await post(base, "/analysis", { remove_steps: -1 });
          assert.equal(bad.status, 400);
          assert.equal((await bad.json()).error.param, "remove_steps");
          const started = await post(base, "/analysis", { max_tokens: 16, window: 16, remove_steps: 1 });
          assert.equal(started.status, 202);
          await started.body?.cancel();
          const body = await waitForJob(base, "/analysis");
          assert.equal(body.status, "done", JSON.stringify(body).slice(0, 300));
          const f = body.report.frontier;
          assert.equal(f.attention.length, 2 * 6, "tiny-nas has six attention sublayers");
          assert.equal(f.frontier[0].steps, 1);
          const swap = await post(base, "/fuse", f.frontier[0].plan);
          assert.equal(swap.status, 200, await swap.clone().text());
          assert.equal((await swap.json()).active.id, f.frontier[0].id);
          const chart = await (await fetch(`${base}/analysis/frontier.svg`)).text();
          assert.equal(
            chart.match(/class="plan"/g)!.length,
            2 * (f.plans.length + 1),
            "every plan measured and the unfused model, in both panels",
          );
          assert.equal(chart.match(/class="active-mark"/g)!.length, 2, "the swapped-in plan is ringed");
          await (await post(base, "/fuse", { ffn_groups: [] })).body?.cancel();
        },
      );

      await t.step("POST /bench runs one benchmark at a time and GET /bench returns the last", async () => {
        const none = await fetch(`${base}/bench`);
        assert.equal(none.status, 404);
        await none.body?.cancel();
        const bad = await post(base, "/bench", { tokens: [0] });
        assert.equal(bad.status, 400);
        await bad.body?.cancel();
        const frontier = (await (await fetch(`${base}/analysis`)).json()).report.frontier.frontier;
        const first = await post(base, "/bench", {
          k: 2,
          tokens: [1],
          decode_tokens: 4,
          rounds: 3,
          batch: [1, 4],
          frontier: true,
        });
        assert.equal(first.status, 202);
        await first.body?.cancel();
        const second = await post(base, "/bench", { k: 2, tokens: [1] });
        assert.equal(second.status, 409);
        assert.match((await second.json()).error.message, /already running/);
        const body = await waitForJob(base, "/bench");
        assert.equal(body.status, "done", JSON.stringify(body).slice(0, 300));
        assert.equal(body.report.device, "wasm");
        // Unfused, the k = 2 group, and the last analysis' frontier plan (1 step).
        const decoded = body.report.decode.map((d: { plan: string }) => d.plan);
        assert.equal(decoded[0], "unfused");
        assert.ok(decoded.includes(frontier[0].id), `${frontier[0].id} decoded: ${decoded}`);
        assert.equal(new Set(decoded).size, decoded.length, "each plan once");
        assert.ok(decoded.length === 2 || decoded.length === 3);
        assert.equal(body.report.decode[0].rounds, 3);
        assert.ok(
          body.report.decode[1].tokens_per_second.min <= body.report.decode[1].tokens_per_second.median,
        );
        assert.match(body.table, /onnxruntime-web FFN graphs/);
        assert.equal(body.report.batched.length, 4, "unfused and fused, at batch 1 and 4");
        assert.match(body.table, /batched decode/);
      });
    } finally {
      await server.stop();
    }
  },
});
