import assert from "node:assert/strict";
import { LiveStats } from "../src/server/live_stats.ts";

Deno.test("live stats: tokens/s over the last 10 whole seconds, TTFT percentiles of the latest requests", () => {
  const live = new LiveStats();
  const t0 = 1_000_000_000_000; // a whole second
  assert.deepEqual(live.snapshot(t0), { tokens_per_second: 0, window_seconds: 10, ttft_ms: null });
  for (let s = 0; s < 15; s++) live.addTokens(100, t0 + s * 1000 + 500);
  live.addTokens(1_000_000, t0 + 15_000 + 10); // the current second is not complete: not counted yet
  // At second 15: seconds 5..14 are the window, 100 tokens each.
  assert.equal(live.snapshot(t0 + 15_000 + 20).tokens_per_second, 100);
  // Much later the ring's old seconds are not counted again.
  assert.equal(live.snapshot(t0 + 60_000).tokens_per_second, 0);
  for (let i = 1; i <= 300; i++) live.addTtft(i / 1000);
  const ttft = live.snapshot(t0).ttft_ms!;
  assert.equal(ttft.samples, 200, "the latest 200 requests");
  assert.equal(ttft.p50, 200);
  assert.equal(ttft.p99, 298);
});
