import assert from "node:assert/strict";
import { join } from "node:path";
import { ROOT } from "./helpers.ts";
import { startServer } from "./server_helpers.ts";

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
