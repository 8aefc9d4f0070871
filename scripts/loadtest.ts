/**
 * Load generator for a running fusedge server (loopback only): N streamed completions at a fixed
 * concurrency, with plan swaps landing during the run. Prints one JSON report: errors, throughput,
 * time-to-first-token percentiles.
 *
 *   scripts/deno run -A scripts/loadtest.ts --url http://127.0.0.1:8000 [--requests 200]
 *     [--concurrency 16] [--max-tokens 16] [--swaps 2] [--storm 1] [--bench] [--admin-token T] [--api-key K]
 *
 * --storm N sends N plan swaps at once at each swap point (the newest must win, the others get 409);
 * --bench starts a self-benchmark on the server a third of the way in and waits for it at the end.
 */
import { parseArgs } from "node:util";
import { sseData } from "../src/client/sse.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    url: { type: "string", default: "http://127.0.0.1:8000" },
    requests: { type: "string", default: "200" },
    concurrency: { type: "string", default: "16" },
    "max-tokens": { type: "string", default: "16" },
    swaps: { type: "string", default: "2" },
    storm: { type: "string", default: "1" },
    bench: { type: "boolean", default: false },
    "admin-token": { type: "string" },
    "api-key": { type: "string" },
  },
});
const url = new URL(values.url!);
if (!["127.0.0.1", "localhost", "[::1]"].includes(url.hostname)) {
  console.error("loadtest only targets loopback addresses");
  Deno.exit(2);
}
const total = Number(values.requests);
const concurrency = Number(values.concurrency);
const maxTokens = Number(values["max-tokens"]);
const swaps = Number(values.swaps);
const storm = Number(values.storm);
const PLANS = [{ ffn_groups: [[3, 4, 5], [6, 7, 8]] }, { ffn_groups: [[2, 3, 4]] }, { ffn_groups: [] }];
const PROMPTS = [
  "def main(",
  "import os\n",
  "class Node:\n    def __init__(self",
  "for i in range(",
  "with open(path) as f:\n",
];

const headers = (token?: string) => ({
  "content-type": "application/json",
  ...(token ? { authorization: `Bearer ${token}` } : {}),
});
const ttft: number[] = [];
const errors: string[] = [];
let tokens = 0;
let started = 0;
let done = 0;
const swapTimes: number[] = [];

async function one(i: number): Promise<void> {
  const t0 = performance.now();
  try {
    const res = await fetch(new URL("/v1/completions", url), {
      method: "POST",
      headers: headers(values["api-key"]),
      body: JSON.stringify({
        prompt: PROMPTS[i % PROMPTS.length],
        max_tokens: maxTokens,
        temperature: 0.8,
        seed: i,
        stream: true,
      }),
    });
    if (res.status !== 200) throw new Error(`status ${res.status}: ${await res.text()}`);
    let first = true;
    let sawDone = false;
    for await (const data of sseData(res.body!)) {
      if (data === "[DONE]") {
        sawDone = true;
        continue;
      }
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message);
      if (first) {
        ttft.push(performance.now() - t0);
        first = false;
      }
      if (event.usage) tokens += event.usage.completion_tokens;
    }
    if (!sawDone) throw new Error("stream ended without [DONE]");
  } catch (e) {
    errors.push(`request ${i}: ${(e as Error).message}`);
  }
}

let superseded = 0;

async function swapper(): Promise<void> {
  for (let k = 1; k <= swaps; k++) {
    while (done < (total * k) / (swaps + 1)) await new Promise((r) => setTimeout(r, 20));
    const t0 = performance.now();
    const statuses = await Promise.all(Array.from({ length: storm }, async (_, j) => {
      const res = await fetch(new URL("/fuse", url), {
        method: "POST",
        headers: headers(values["admin-token"]),
        body: JSON.stringify(PLANS[(k - 1 + j) % PLANS.length]),
      });
      await res.body?.cancel();
      return res.status;
    }));
    const landed = statuses.filter((s) => s === 200).length;
    superseded += statuses.filter((s) => s === 409).length;
    if (landed === 0 || statuses.some((s) => s !== 200 && s !== 409)) {
      errors.push(`swap ${k}: statuses ${statuses.join(",")}`);
    }
    for (let i = 0; i < landed; i++) swapTimes.push(performance.now() - t0);
  }
}

let benchStatus: string | null = null;

async function bencher(): Promise<void> {
  if (!values.bench) return;
  while (done < total / 3) await new Promise((r) => setTimeout(r, 20));
  const res = await fetch(new URL("/bench", url), {
    method: "POST",
    headers: headers(values["admin-token"]),
    body: JSON.stringify({ k: 2, tokens: [1], decode_tokens: 8, rounds: 3 }),
  });
  await res.body?.cancel();
  if (res.status !== 202) errors.push(`bench: status ${res.status}`);
  while (done < total) await new Promise((r) => setTimeout(r, 50));
  for (let i = 0; i < 1200; i++) {
    benchStatus = (await (await fetch(new URL("/bench", url))).json()).status;
    if (benchStatus !== "running") break;
    await new Promise((r) => setTimeout(r, 100));
  }
  if (benchStatus !== "done") errors.push(`bench ended ${benchStatus}`);
}

const t0 = performance.now();
const workers = Array.from({ length: concurrency }, async () => {
  while (started < total) {
    const i = started++;
    await one(i);
    done++;
  }
});
await Promise.all([...workers, swapper(), bencher()]);
const seconds = (performance.now() - t0) / 1000;
const pct = (p: number) => {
  const s = [...ttft].sort((a, b) => a - b);
  return s.length ? s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] : NaN;
};
console.log(JSON.stringify({
  requests: total,
  concurrency,
  completed: total - errors.length,
  errors: errors.length,
  error_samples: errors.slice(0, 5),
  seconds,
  tokens,
  tokens_per_second: tokens / seconds,
  requests_per_second: total / seconds,
  ttft_p50_ms: pct(50),
  ttft_p99_ms: pct(99),
  swaps: swapTimes.length,
  superseded,
  swap_ms: swapTimes,
  bench: benchStatus,
}));
