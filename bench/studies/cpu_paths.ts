/**
 * The CPU serving paths on one model in one run: each path (device and weights) is a `serve` process of
 * its own, so its peak resident memory is the serving process's and nothing else's; after each has
 * loaded and decoded a warm-up, rounds take the paths in turn (the order rotating) and measure, over
 * HTTP as a client sees it: decode tokens/s of one stream (between its first and last token), the
 * aggregate tokens/s of `--batch` concurrent streams against one stream's by the same clock, prefill
 * tokens/s (a prompt of about `--prefill` tokens that no cache holds, over its time to first token),
 * and the server's CPU seconds per 1000 decoded tokens (from /proc). Prints a JSON report and a table.
 *
 *   scripts/deno run -A bench/studies/cpu_paths.ts --model DIR [--paths wasm:fp32,wasm:int8,cpu:fp32,cpu:int8,cpu:int4]
 *     [--threads N] [--max-context 1024] [--tokens 32] [--batch 8] [--prefill 128] [--rounds 3]
 *     [--temperature 0.8] [--kv-cache-mb MB] [--glibc-tunables "A;B"] [--out FILE]
 *
 * `--glibc-tunables` serves each path once per setting (`;` between settings, each a GLIBC_TUNABLES value,
 * `:` within one): a process-wide setting compared in the same rounds, each server started with it.
 *
 * A path whose server refuses the model (too big for WASM's heap, no native onnxruntime) is listed with
 * its reason. Paths are loaded one at a time and stay up together: the machine must hold all of them.
 */
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { fail, positive, scriptFlags } from "../../scripts/args.ts";
import { sseData } from "../../src/client/sse.ts";
import { type Spread, spread } from "../../src/numeric.ts";
import { cpuSeconds, startServe, statusBytes } from "./serve_process.ts";

const root = fileURLToPath(new URL("../..", import.meta.url));
const values = scriptFlags({
  model: { type: "string", default: join(root, "models", "tiny-nas") },
  paths: { type: "string", default: "wasm:fp32,wasm:int8,cpu:fp32,cpu:int8,cpu:int4" },
  threads: { type: "string" },
  "max-context": { type: "string", default: "1024" },
  tokens: { type: "string", default: "32" },
  batch: { type: "string", default: "8" },
  prefill: { type: "string", default: "128" },
  temperature: { type: "string", default: "0.8" },
  rounds: { type: "string", default: "3" },
  "kv-cache-mb": { type: "string" },
  "glibc-tunables": { type: "string" },
  out: { type: "string" },
});
const tokens = positive("tokens", values.tokens!);
const batch = positive("batch", values.batch!);
const prefill = positive("prefill", values.prefill!);
const rounds = positive("rounds", values.rounds!);
const temperature = Number(values.temperature);
if (!(temperature >= 0)) fail(`--temperature: expected a number >= 0, got ${values.temperature}`);
const tunables = values["glibc-tunables"]?.split(";") ?? [null];
if (tunables.some((t) => t !== null && !/^[\w.]+=[^:;=\s]+(:[\w.]+=[^:;=\s]+)*$/.test(t))) {
  fail(`--glibc-tunables: expected settings such as glibc.malloc.hugetlb=0;glibc.malloc.hugetlb=1`);
}
const paths = values.paths!.split(",").flatMap((p) => {
  const [device, weights] = p.split(":");
  if (!["wasm", "cpu"].includes(device) || !["fp32", "int8", "int4"].includes(weights)) {
    fail(`--paths: "${p}" is not device:weights (wasm or cpu; fp32, int8 or int4)`);
  }
  return tunables.map((t) => ({ device, weights, tunables: t, name: t === null ? p : `${p} ${t}` }));
});
const text = await Deno.readTextFile(join(root, "data", "eval.py.txt"));

interface Server {
  name: string;
  url: string;
  pid: number;
  child: Deno.ChildProcess;
  loadMs: number;
  weightBytes: number;
  rssLoaded: number;
}

/** Starts `serve` for a path and waits for its `ready` line; a refusal returns its message. */
async function start(p: (typeof paths)[number]): Promise<Server | string> {
  const args = ["run", "-A", join(root, "main.ts"), "serve", "--model", values.model!, "--port", "0"];
  args.push("--device", p.device, "--max-context", values["max-context"]!, "--max-active", String(batch));
  if (p.weights !== "fp32") args.push("--quantize", p.weights);
  if (values.threads && p.device === "cpu") args.push("--threads", values.threads);
  if (values["kv-cache-mb"]) args.push("--kv-cache-mb", values["kv-cache-mb"]);
  const t0 = performance.now();
  const env = p.tunables === null ? undefined : { GLIBC_TUNABLES: p.tunables };
  const started = await startServe(args, env);
  if (!("child" in started)) return `exit ${started.code}: ${started.stderr.split("\n").pop()}`;
  const { child, port } = started;
  const url = `http://127.0.0.1:${port}`;
  const health = await (await fetch(`${url}/health`)).json();
  return {
    name: p.name,
    url,
    pid: child.pid,
    child,
    loadMs: performance.now() - t0,
    weightBytes: health.weight_bytes,
    rssLoaded: await statusBytes(child.pid, "VmRSS"),
  };
}

let nonce = 0;

/** One streamed completion: token arrival times and the usage the server reported. */
async function stream(s: Server, prompt: string, maxTokens: number) {
  const t0 = performance.now();
  const res = await fetch(`${s.url}/v1/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ prompt, max_tokens: maxTokens, temperature, seed: nonce, stream: true }),
  });
  if (res.status !== 200) throw new Error(`${s.name}: status ${res.status}: ${await res.text()}`);
  const times: number[] = [];
  let usage = { prompt_tokens: 0, completion_tokens: 0 };
  for await (const data of sseData(res.body!)) {
    if (data === "[DONE]") continue;
    const event = JSON.parse(data);
    if (event.error) throw new Error(`${s.name}: ${event.error.message}`);
    if (event.choices?.[0]?.text) times.push(performance.now() - t0);
    if (event.usage) usage = event.usage;
  }
  return { times, end: performance.now() - t0, usage };
}

/** A short prompt no cache holds (a unique first line). */
const shortPrompt = () => `# request ${++nonce}\ndef main(`;
/** About `prefill` tokens of held-out text (4 characters a token is typical of code) behind a unique line. */
const longPrompt = () => `# request ${++nonce}\n${text.slice((nonce * 997) % 100000).slice(0, prefill * 4)}`;

interface Sample {
  decode: number;
  single: number;
  aggregate: number;
  prefill: number;
  cpuPerKtok: number;
}

async function measure(s: Server): Promise<Sample> {
  const cpu0 = await cpuSeconds(s.pid);
  const one = await stream(s, shortPrompt(), tokens);
  const cpu1 = await cpuSeconds(s.pid);
  const t0 = performance.now();
  const many = await Promise.all(Array.from({ length: batch }, () => stream(s, shortPrompt(), tokens)));
  const wall = performance.now() - t0;
  const pre = await stream(s, longPrompt(), 1);
  const n = one.times.length;
  return {
    decode: ((n - 1) * 1000) / (one.times[n - 1] - one.times[0]),
    single: (one.usage.completion_tokens * 1000) / one.end,
    aggregate: (many.reduce((a, r) => a + r.usage.completion_tokens, 0) * 1000) / wall,
    prefill: (pre.usage.prompt_tokens * 1000) / pre.times[0],
    cpuPerKtok: ((cpu1 - cpu0) * 1000) / one.usage.completion_tokens,
  };
}

const servers: Server[] = [];
const skipped: { path: string; reason: string }[] = [];
try {
  for (const p of paths) {
    console.error(`cpu_paths: starting ${p.name}`);
    const s = await start(p);
    if (typeof s === "string") skipped.push({ path: p.name, reason: s });
    else {
      servers.push(s);
      await measure(s); // warm-up
    }
  }
  const samples = new Map<string, Sample[]>(servers.map((s) => [s.name, []]));
  for (let round = 0; round < rounds; round++) {
    const order = servers.map((_, i) => servers[(i + round) % servers.length]);
    for (const s of order) {
      console.error(`cpu_paths: round ${round + 1}/${rounds}: ${s.name}`);
      samples.get(s.name)!.push(await measure(s));
    }
  }
  const rows = [];
  for (const s of servers) {
    const got = samples.get(s.name)!;
    const of = (k: keyof Sample) => spread(got.map((x) => x[k]));
    const peak = await statusBytes(s.pid, "VmHWM");
    rows.push({
      path: s.name,
      weight_mb: s.weightBytes / 1e6,
      load_s: s.loadMs / 1000,
      decode_tokens_per_second: of("decode"),
      single_stream_tokens_per_second: of("single"),
      aggregate_tokens_per_second: of("aggregate"),
      aggregate_over_single: spread(got.map((x) => x.aggregate / x.single)),
      prefill_tokens_per_second: of("prefill"),
      cpu_seconds_per_1000_tokens: of("cpuPerKtok"),
      rss_loaded_mb: s.rssLoaded / 1e6,
      peak_rss_mb: peak / 1e6,
      peak_over_weights: peak / s.weightBytes,
    });
  }
  const report = {
    model: values.model,
    threads: values.threads ?? "default",
    max_context: Number(values["max-context"]),
    tokens,
    batch,
    prefill,
    rounds,
    temperature,
    rows,
    skipped,
  };
  const f = (x: Spread, d = 1) => `${x.median.toFixed(d)} [${x.min.toFixed(d)}-${x.max.toFixed(d)}]`;
  const table = [
    `| path | weights MB | load s | decode tok/s (1 stream) | aggregate tok/s (${batch} streams) | over 1 stream | prefill tok/s | CPU s / 1000 tok | peak RSS MB | peak / weights |`,
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ...rows.map((r) =>
      `| ${r.path} | ${r.weight_mb.toFixed(0)} | ${r.load_s.toFixed(1)} | ${
        f(r.decode_tokens_per_second)
      } | ${f(r.aggregate_tokens_per_second)} | ${f(r.aggregate_over_single, 2)}x | ${
        f(r.prefill_tokens_per_second)
      } | ${f(r.cpu_seconds_per_1000_tokens, 2)} | ${r.peak_rss_mb.toFixed(0)} | ${
        r.peak_over_weights.toFixed(2)
      }x |`
    ),
    ...skipped.map((s) => `| ${s.path} | not served: ${s.reason} |`),
  ].join("\n");
  const json = JSON.stringify(report, null, 1);
  if (values.out) await Deno.writeTextFile(values.out, `${table}\n\n${json}\n`);
  console.log(table);
  console.log(json);
} finally {
  for (const s of servers) {
    try {
      s.child.kill("SIGTERM");
      await s.child.status;
    } catch {
      // already gone
    }
  }
}
