import assert from "node:assert/strict";
import { join } from "node:path";
import { ROOT } from "./helpers.ts";
import { startServer } from "./server_helpers.ts";

type Spread = { median: number; min: number; max: number };

Deno.test({
  name:
    "load: 200 streamed completions at concurrency 16, two swap storms and a /bench, from a separate process: 0 errors",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const server = await startServer(["--device", "wasm", "--max-active", "16"]);
    await server.ready;
    try {
      const out = await new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "-A",
          join(ROOT, "scripts", "loadtest.ts"),
          "--url",
          server.base,
          "--requests",
          "200",
          "--concurrency",
          "16",
          "--max-tokens",
          "16",
          "--storm",
          "3",
          "--bench",
          "--levels",
          "1,4,16",
          "--chat",
          "6",
        ],
        stdout: "piped",
        stderr: "inherit",
      }).output();
      assert.equal(out.code, 0);
      const report = JSON.parse(new TextDecoder().decode(out.stdout));
      console.log(
        `load: ${report.requests_per_second.toFixed(1)} req/s, ${
          report.tokens_per_second.toFixed(0)
        } tok/s, TTFT p50 ${report.ttft_p50_ms.toFixed(0)} ms, p99 ${report.ttft_p99_ms.toFixed(0)} ms`,
      );
      for (const [c, l] of Object.entries(report.levels as Record<string, Record<string, Spread>>)) {
        const t = l.tokens_per_second;
        console.log(
          `load: concurrency ${c}: ${t.median.toFixed(0)} tok/s [${t.min.toFixed(0)}-${t.max.toFixed(0)}], ${
            l.speedup.median.toFixed(2)
          }x of concurrency 1 [${l.speedup.min.toFixed(2)}-${l.speedup.max.toFixed(2)}], ${
            l.cpu_seconds_per_1000_tokens.median.toFixed(2)
          } CPU s per 1000 tokens`,
        );
      }
      for (const l of Object.values(report.levels as Record<string, Record<string, Spread>>)) {
        assert.ok(l.tokens_per_second.min > 0 && l.tokens_per_second.min <= l.tokens_per_second.median);
      }
      const chat = report.chat;
      console.log(
        `load: chat of ${chat.turns} turns: TTFT ${
          chat.ttft_ms_cached_prefix.median.toFixed(0)
        } ms from a cached prefix, ${
          chat.ttft_ms_no_prefix.median.toFixed(0)
        } ms without; ${chat.prefix_cache_hits} prefix-cache hits`,
      );
      assert.ok(
        chat.prefix_cache_hits >= chat.turns - 1,
        "every turn after the first starts from the one before",
      );
      const kv = report.kv_cache;
      console.log(
        `load: KV cache at most ${(kv.max_used_bytes / 2 ** 20).toFixed(1)} MB held, ${
          (kv.max_reserved_bytes / 2 ** 20).toFixed(1)
        } MB reserved, of ${(kv.budget_bytes / 2 ** 20).toFixed(0)} MB`,
      );
      assert.ok(kv.max_used_bytes > 0 && kv.max_used_bytes <= kv.budget_bytes, JSON.stringify(kv));
      assert.ok(kv.max_reserved_bytes <= kv.budget_bytes);
      assert.equal(report.errors, 0, JSON.stringify(report.error_samples));
      assert.equal(report.completed, 200);
      assert.ok(report.swaps >= 2, `${report.swaps} swaps landed`);
      assert.equal(report.swaps + report.superseded, 6, "every swap of the storms landed or was superseded");
      assert.equal(report.bench, "done");
      // Sampled text may end at EOS before max_tokens under some plans of the storm.
      assert.ok(report.tokens > 0.9 * 200 * 16 && report.tokens <= 200 * 16, `${report.tokens} tokens`);
      assert.ok(report.ttft_p99_ms >= report.ttft_p50_ms);
      const fuse = await (await fetch(`${server.base}/fuse`)).json();
      assert.equal(fuse.swaps, report.swaps);
      assert.equal(fuse.retiring, 0);
    } finally {
      await server.stop();
    }
  },
});
