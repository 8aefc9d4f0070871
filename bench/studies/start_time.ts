/**
 * A server's cold start as a user has it: `serve` from launch to its `ready` line (the checkpoint read,
 * every weight converted into a weight cache of its own, the sessions created), each start a process of
 * its own: seconds to ready, the server's CPU seconds by then and its peak resident memory, median
 * [min-max] of `--rounds`. `--roots` compares checkouts, taken in turn in each round, e.g. a change
 * against the commit before it: `git worktree add --detach /tmp/base REV`, then `--roots /tmp/base,.`
 * (each serves with its own main.ts and deno.json).
 *
 *   scripts/deno run -A bench/studies/start_time.ts [--model DIR] [--device wasm|cpu] [--quantize none|int8|int4]
 *     [--max-context 1024] [--roots DIR,DIR] [--rounds 3] [--json]
 */
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { fail, positive, scriptFlags } from "../../scripts/args.ts";
import { type Spread, spread } from "../../src/numeric.ts";
import { cpuSeconds, startServe, statusBytes } from "./serve_process.ts";

const root = fileURLToPath(new URL("../..", import.meta.url));
const values = scriptFlags({
  model: { type: "string", default: join(root, "models", "tiny-nas") },
  device: { type: "string", default: "wasm" },
  quantize: { type: "string", default: "none" },
  "max-context": { type: "string", default: "1024" },
  roots: { type: "string", default: root },
  rounds: { type: "string", default: "3" },
  json: { type: "boolean", default: false },
});
const { device, quantize } = values;
if (device !== "wasm" && device !== "cpu") fail(`--device: wasm or cpu, got ${device}`);
if (!["none", "int8", "int4"].includes(quantize!)) fail(`--quantize: none, int8 or int4, got ${quantize}`);
const rounds = positive("rounds", values.rounds!);
const maxContext = positive("max-context", values["max-context"]!);
const model = resolve(values.model!);
const checkouts = values.roots!.split(",").map((r) => resolve(r));
for (const c of checkouts) {
  try {
    Deno.statSync(join(c, "main.ts"));
  } catch {
    fail(`--roots: ${c} is not a fusedge checkout (no main.ts)`);
  }
}

interface Start {
  ready_s: number;
  cpu_s: number;
  peak_rss_mb: number;
}

/** Starts `serve` from a checkout, waits for its `ready` line, reads its /proc figures and stops it. */
async function startOnce(checkout: string): Promise<Start> {
  const args = ["run", "-A", "--config", join(checkout, "deno.json"), join(checkout, "main.ts"), "serve"];
  args.push("--model", model, "--port", "0", "--device", device!, "--max-context", String(maxContext));
  if (quantize !== "none") args.push("--quantize", quantize!);
  const started = await startServe(args);
  if (!("child" in started)) {
    return fail(`${checkout}: serve exited ${started.code} before it was ready:\n${started.stderr}`);
  }
  const { child, readyMs } = started;
  const cpu = await cpuSeconds(child.pid);
  const peak = await statusBytes(child.pid, "VmHWM");
  child.kill("SIGKILL");
  await child.status;
  return { ready_s: readyMs / 1000, cpu_s: cpu, peak_rss_mb: peak / 2 ** 20 };
}

const starts = new Map<string, Start[]>(checkouts.map((c) => [c, []]));
for (let round = 0; round < rounds; round++) {
  // The order rotates, so that neither side always starts on a page cache the other has just warmed.
  for (let i = 0; i < checkouts.length; i++) {
    const checkout = checkouts[(round + i) % checkouts.length];
    console.error(`start_time: round ${round + 1}/${rounds}: ${checkout}`);
    starts.get(checkout)!.push(await startOnce(checkout));
  }
}

const rows = checkouts.map((checkout) => {
  const s = starts.get(checkout)!;
  return {
    root: checkout,
    ready_s: spread(s.map((x) => x.ready_s)),
    cpu_s: spread(s.map((x) => x.cpu_s)),
    peak_rss_mb: spread(s.map((x) => x.peak_rss_mb)),
  };
});
const report = { model, device, quantize, max_context: maxContext, rounds, rows };
if (values.json) console.log(JSON.stringify(report, null, 1));
else {
  const f = (x: Spread, d = 1) => `${x.median.toFixed(d)} [${x.min.toFixed(d)}-${x.max.toFixed(d)}]`;
  console.log(
    `${model}, serve --device ${device} --quantize ${quantize}, ${rounds} rounds, median [min-max]`,
  );
  console.log("| checkout | ready s | CPU s | peak RSS MB |\n| --- | --- | --- | --- |");
  for (const r of rows) {
    console.log(`| ${r.root} | ${f(r.ready_s)} | ${f(r.cpu_s)} | ${f(r.peak_rss_mb, 0)} |`);
  }
}
