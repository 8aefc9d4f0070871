/**
 * Load generator for a running fusedge server (loopback only): N streamed completions at a fixed
 * concurrency, with plan swaps landing during the run. Prints one JSON report: errors, throughput,
 * time-to-first-token percentiles.
 *
 *   scripts/deno run -A scripts/loadtest.ts --url http://127.0.0.1:8000 [--requests 200]
 *     [--concurrency 16] [--max-tokens 16] [--swaps 2] [--storm 1] [--bench] [--admin-token T] [--api-key K]
 *     [--levels 1,4,16 --level-rounds 3 --level-tokens 64] [--chat 8] [--ab URL_B --ab-rounds 3]
 *     [--heavy 5 --heavy-n 8]
 *
 * --storm N sends N plan swaps at once at each swap point (the newest must win, the others get 409);
 * --bench starts a self-benchmark on the server a third of the way in and waits for it at the end.
 * --levels first measures aggregate throughput at each concurrency: a warm-up, then rounds in which
 * the levels take turns (4 x level requests each), reporting the median and range of tokens/s, of the
 * server's CPU seconds per 1000 tokens (from its /metrics) and of each level's rate over level 1's.
 * --chat N first plays a conversation of N turns, each prompt the previous one plus its answer and a
 * new line: each turn is sent as it is (its start is cached from the turn before) and, in alternating
 * order, with a unique first line (nothing to reuse); reports both TTFTs and the prefix-cache hit
 * rate from /metrics.
 * --ab URL_B only compares two servers (say, two versions): see `ab` below.
 * --heavy N only measures what heavy answers do to a stream: see `heavy` below.
 */
import { fail, positive, scriptFlags } from "./args.ts";
import { sseData } from "../src/client/sse.ts";
import { spread } from "../src/numeric.ts";

const values = scriptFlags({
  url: { type: "string", default: "http://127.0.0.1:8000" },
  requests: { type: "string", default: "200" },
  concurrency: { type: "string", default: "16" },
  "max-tokens": { type: "string", default: "16" },
  swaps: { type: "string", default: "2" },
  storm: { type: "string", default: "1" },
  bench: { type: "boolean", default: false },
  levels: { type: "string" },
  "level-rounds": { type: "string", default: "3" },
  "level-tokens": { type: "string", default: "64" },
  chat: { type: "string", default: "0" },
  ab: { type: "string" },
  "ab-rounds": { type: "string", default: "3" },
  heavy: { type: "string", default: "0" },
  "heavy-n": { type: "string", default: "8" },
  "admin-token": { type: "string" },
  "api-key": { type: "string" },
});
const url = new URL(values.url!);
if (
  ![url, ...(values.ab ? [new URL(values.ab)] : [])].every((u) =>
    ["127.0.0.1", "localhost", "[::1]"].includes(u.hostname)
  )
) {
  fail("loadtest only targets loopback addresses");
}
const total = positive("requests", values.requests!);
const concurrency = positive("concurrency", values.concurrency!);
const maxTokens = positive("max-tokens", values["max-tokens"]!);
const whole = (flag: string, value: string) => value === "0" ? 0 : positive(flag, value);
const swaps = whole("swaps", values.swaps!);
const storm = whole("storm", values.storm!);
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
let started = 0;
let done = 0;
const swapTimes: number[] = [];

/** First-token times and generated tokens of a set of requests. */
interface Tally {
  ttft: number[];
  tokens: number;
}
const main: Tally = { ttft, tokens: 0 };

async function one(i: number, base = url, tally = main): Promise<void> {
  const t0 = performance.now();
  try {
    const res = await fetch(new URL("/v1/completions", base), {
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
        tally.ttft.push(performance.now() - t0);
        first = false;
      }
      if (event.usage) tally.tokens += event.usage.completion_tokens;
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

/** The server's CPU seconds so far (its /metrics), or NaN where it cannot tell. */
async function serverCpu(): Promise<number> {
  const text = await (await fetch(new URL("/metrics", url))).text();
  const m = text.match(/^fusedge_process_cpu_seconds_total (\S+)$/m);
  return m ? Number(m[1]) : NaN;
}

/** One throughput sample: `4 x c` completions at concurrency c, sampled, `level-tokens` each. */
async function levelRun(c: number, round: number): Promise<{ tokensPerSecond: number; cpuPerKtok: number }> {
  const n = 4 * c;
  let next = 0;
  let count = 0;
  const cpu0 = await serverCpu();
  const t0 = performance.now();
  await Promise.all(Array.from({ length: c }, async () => {
    while (next < n) {
      const i = next++;
      const res = await fetch(new URL("/v1/completions", url), {
        method: "POST",
        headers: headers(values["api-key"]),
        body: JSON.stringify({
          prompt: PROMPTS[(i + round) % PROMPTS.length],
          max_tokens: positive("level-tokens", values["level-tokens"]!),
          temperature: 0.8,
          seed: 1000 * round + i,
        }),
      });
      const body = await res.json();
      if (res.status !== 200) throw new Error(`level ${c}: status ${res.status}: ${JSON.stringify(body)}`);
      count += body.usage.completion_tokens;
    }
  }));
  const seconds = (performance.now() - t0) / 1000;
  return { tokensPerSecond: count / seconds, cpuPerKtok: ((await serverCpu()) - cpu0) / (count / 1000) };
}

async function levels(): Promise<Record<string, unknown> | null> {
  if (!values.levels) return null;
  const cs = values.levels.split(",").map(Number);
  await levelRun(Math.max(...cs), 99); // warm-up: sessions, JIT, allocations
  const samples = new Map(cs.map((c) => [c, [] as { tokensPerSecond: number; cpuPerKtok: number }[]]));
  for (let round = 0; round < positive("level-rounds", values["level-rounds"]!); round++) {
    for (const c of cs) samples.get(c)!.push(await levelRun(c, round));
  }
  const base = samples.get(cs[0])!;
  return Object.fromEntries(cs.map((c) => {
    const s = samples.get(c)!;
    return [c, {
      tokens_per_second: spread(s.map((x) => x.tokensPerSecond)),
      cpu_seconds_per_1000_tokens: spread(s.map((x) => x.cpuPerKtok)),
      // Per round, against level 1 of the same round: the ratio the rounds agree on.
      speedup: spread(s.map((x, r) => x.tokensPerSecond / base[r].tokensPerSecond)),
    }];
  }));
}

/** Time to the first streamed token of one completion, and the text it produced. */
async function firstToken(prompt: string, maxTokens: number): Promise<{ ttft: number; text: string }> {
  const t0 = performance.now();
  const res = await fetch(new URL("/v1/completions", url), {
    method: "POST",
    headers: headers(values["api-key"]),
    body: JSON.stringify({ prompt, max_tokens: maxTokens, temperature: 0, stream: true }),
  });
  if (res.status !== 200) throw new Error(`chat: status ${res.status}: ${await res.text()}`);
  let ttft = NaN;
  let text = "";
  for await (const data of sseData(res.body!)) {
    if (data === "[DONE]") continue;
    const piece = JSON.parse(data).choices?.[0]?.text ?? "";
    if (piece && Number.isNaN(ttft)) ttft = performance.now() - t0;
    text += piece;
  }
  return { ttft, text };
}

async function chat(): Promise<Record<string, unknown> | null> {
  const turns = whole("chat", values.chat!);
  if (!turns) return null;
  const metric = async (name: string) =>
    Number(
      (await (await fetch(new URL("/metrics", url))).text()).match(new RegExp(`^${name} (\\S+)$`, "m"))?.[1],
    );
  const hits0 = await metric("fusedge_prefix_cache_hits_total");
  let conversation = "# a conversation about parsing\n";
  const warm: number[] = [];
  const cold: number[] = [];
  for (let k = 0; k < turns; k++) {
    conversation += `${PROMPTS[k % PROMPTS.length]}`;
    // Cold: the same prompt behind a first line no cache holds; the two go in alternating order.
    const coldPrompt = `${crypto.randomUUID()}\n${conversation}`;
    const runs = k % 2 ? [coldPrompt, conversation] : [conversation, coldPrompt];
    for (const prompt of runs) {
      const r = await firstToken(prompt, 24);
      (prompt === conversation ? warm : cold).push(r.ttft);
      if (prompt === conversation) conversation += r.text + "\n";
    }
  }
  const hits = (await metric("fusedge_prefix_cache_hits_total")) - hits0;
  return {
    turns,
    ttft_ms_cached_prefix: spread(warm.slice(1)),
    ttft_ms_no_prefix: spread(cold.slice(1)),
    prefix_cache_hits: hits,
    hit_rate: hits / (2 * turns),
  };
}

/** Polls /health while `work` runs: the most KV memory the server held and reserved, and its budget. */
async function watchKv<T>(work: Promise<T>): Promise<{ result: T; kv: Record<string, number> }> {
  const kv = { budget_bytes: 0, max_used_bytes: 0, max_reserved_bytes: 0 };
  let running = true;
  const poll = (async () => {
    while (running) {
      const h = (await (await fetch(new URL("/health", url))).json()).kv_cache;
      if (h) {
        kv.budget_bytes = h.budget_bytes;
        kv.max_used_bytes = Math.max(kv.max_used_bytes, h.used_bytes);
        kv.max_reserved_bytes = Math.max(kv.max_reserved_bytes, h.reserved_bytes);
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  })();
  try {
    return { result: await work, kv };
  } finally {
    running = false;
    await poll;
  }
}

const pct = (p: number, of = ttft) => {
  const s = [...of].sort((a, b) => a - b);
  return s.length ? s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] : NaN;
};

/**
 * --ab URL: the same requests at the same concurrency against --url and URL, the two taking turns in
 * rounds after a warm-up of each (no swaps); TTFT p50/p99 and tokens/s per side, median [min-max].
 */
async function ab(): Promise<Record<string, unknown> | null> {
  if (!values.ab) return null;
  const sides = { a: url, b: new URL(values.ab) };
  const rounds = positive("ab-rounds", values["ab-rounds"]!);
  const out: Record<string, { p50: number[]; p99: number[]; tps: number[] }> = {};
  for (let r = -1; r < rounds; r++) {
    // Alternate which side goes first, so neither always follows the other's load.
    for (const side of r % 2 ? ["a", "b"] as const : ["b", "a"] as const) {
      const tally: Tally = { ttft: [], tokens: 0 };
      const t = performance.now();
      let next = 0;
      await Promise.all(Array.from({ length: concurrency }, async () => {
        while (next < total) await one(next++, sides[side], tally);
      }));
      if (r < 0) continue; // warm-up
      const o = out[side] ??= { p50: [], p99: [], tps: [] };
      o.p50.push(pct(50, tally.ttft));
      o.p99.push(pct(99, tally.ttft));
      o.tps.push(tally.tokens / ((performance.now() - t) / 1000));
    }
  }
  const side = (k: "a" | "b") => ({
    url: sides[k].href,
    ttft_p50_ms: spread(out[k].p50),
    ttft_p99_ms: spread(out[k].p99),
    tokens_per_second: spread(out[k].tps),
  });
  return { rounds, requests_per_round: total, concurrency, a: side("a"), b: side("b") };
}

/** A stream's largest gap between two events after its first, in ms. */
async function largestGap(prompt: string, tokens: number): Promise<number> {
  const res = await fetch(new URL("/v1/completions", url), {
    method: "POST",
    headers: headers(values["api-key"]),
    body: JSON.stringify({ prompt, max_tokens: tokens, temperature: 0, stream: true }),
  });
  if (res.status !== 200) throw new Error(`status ${res.status}: ${await res.text()}`);
  let last = 0;
  let gap = 0;
  for await (const _ of sseData(res.body!)) {
    const now = performance.now();
    if (last) gap = Math.max(gap, now - last);
    last = now;
  }
  return gap;
}

/**
 * --heavy N: the answers a client can make heaviest (n=8, 20 alternatives a token, the prompt of
 * ~800 tokens echoed with its logprobs: ~4 MB of JSON each, three at once) against one stream's
 * largest gap between tokens (--heavy-n 1: the same JSON work with one choice, so the engine
 * decodes 3 sequences beside the stream instead of 24). N rounds after a warm-up; in each, the stream runs alone and beside
 * the heavy answers, in alternating order. Reports the largest gap of each side, median [min-max].
 */
async function heavy(): Promise<Record<string, unknown> | null> {
  const rounds = whole("heavy", values.heavy!);
  if (!rounds) return null;
  const n = positive("heavy-n", values["heavy-n"]!);
  const prompt = "def scale(values, factor):\n    return [v * factor for v in values]\n\n".repeat(40);
  const answer = async () => {
    const res = await fetch(new URL("/v1/completions", url), {
      method: "POST",
      headers: headers(values["api-key"]),
      body: JSON.stringify({ prompt, n, logprobs: 20, echo: true, max_tokens: 8, temperature: 0.8 }),
    });
    if (res.status !== 200) throw new Error(`status ${res.status}: ${await res.text()}`);
    return (await res.arrayBuffer()).byteLength;
  };
  const gaps = { alone: [] as number[], beside: [] as number[] };
  let bytes = 0;
  for (let r = -1; r < rounds; r++) {
    for (const side of r % 2 ? ["alone", "beside"] as const : ["beside", "alone"] as const) {
      let gap = 0;
      if (side === "alone") gap = await largestGap("def main(", 96);
      else {
        let answering = true;
        const answers = Promise.all([answer(), answer(), answer()]).finally(() => (answering = false));
        // Streams for as long as the answers are being made, one after another.
        while (answering) gap = Math.max(gap, await largestGap("def main(", 96));
        bytes = Math.max(...await answers);
      }
      if (r >= 0) gaps[side].push(gap);
    }
  }
  return {
    rounds,
    n,
    answer_bytes: bytes,
    largest_gap_ms_alone: spread(gaps.alone),
    largest_gap_ms_beside_heavy: spread(gaps.beside),
  };
}

const heavyReport = await heavy();
if (heavyReport) {
  console.log(JSON.stringify({ heavy: heavyReport }));
  Deno.exit(0);
}
const abReport = await ab();
if (abReport) {
  console.log(JSON.stringify({ ab: abReport, errors: errors.length, error_samples: errors.slice(0, 5) }));
  Deno.exit(errors.length ? 1 : 0);
}
const chatReport = await chat();
const levelReport = await levels();
const t0 = performance.now();
const workers = Array.from({ length: concurrency }, async () => {
  while (started < total) {
    const i = started++;
    await one(i);
    done++;
  }
});
const { kv: kvReport } = await watchKv(Promise.all([...workers, swapper(), bencher()]));
const seconds = (performance.now() - t0) / 1000;
console.log(JSON.stringify({
  requests: total,
  concurrency,
  completed: total - errors.length,
  errors: errors.length,
  error_samples: errors.slice(0, 5),
  seconds,
  tokens: main.tokens,
  tokens_per_second: main.tokens / seconds,
  requests_per_second: total / seconds,
  ttft_p50_ms: pct(50),
  ttft_p99_ms: pct(99),
  swaps: swapTimes.length,
  superseded,
  swap_ms: swapTimes,
  bench: benchStatus,
  levels: levelReport,
  chat: chatReport,
  kv_cache: kvReport,
}));
