/**
 * A decode step's host cost on WebGPU before and after the decoder of fused operators, static KV
 * slots, graph capture and GPU sampling (issue 24), alternated in one process: "before" is the code
 * at --baseline (default 2a553cf, the last commit without them: the hand-built attention graph, its
 * KV cache grown by Concat each step, the single-sequence loop that picks tokens with an argmax
 * kernel), extracted from git into a temporary directory and imported beside the current code;
 * "after" is the current instance's SlotDecoder step (src/bench/step_profile.ts). Both decode the
 * same prompt greedily at batch 1 on the same adapter; per round each takes --steps steps after a
 * warm-up, the order flipped every round.
 *
 * Host ms is a step's wall time less the time spent inside queue.submit (lavapipe runs the kernels
 * inside submit; on a GPU it returns at once) and less the serving loop's turn of the event loop
 * (a zero-delay timer each side takes once per 15 ms of work): what is left is the host's own work,
 * onnxruntime's kernel setup, bind groups and uniform writes, or the replay's encoding.
 *
 * `--sides after` profiles the current code alone (a model too big to hold twice, such as the 1B shape).
 *
 *   scripts/deno run -A bench/studies/host_step.ts [--model DIR] [--baseline REV] [--steps 24]
 *     [--rounds 5] [--sides before,after] [--json]
 */
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { fail, positive, scriptFlags } from "../../scripts/args.ts";
import { profileSteps } from "../../src/bench/step_profile.ts";
import { UNFUSED } from "../../src/fusion/plan.ts";
import { type Spread, spread } from "../../src/numeric.ts";
import { buildInstance, loadAssets } from "../../src/instance/build.ts";
import { resolveDevice, resolveGraphOptions } from "../../src/ort/ort.ts";
import { GpuCounters } from "../../src/webgpu/counters.ts";

const root = fileURLToPath(new URL("../..", import.meta.url));
const values = scriptFlags({
  model: { type: "string", default: join(root, "models", "tiny-nas") },
  baseline: { type: "string", default: "2a553cf" },
  steps: { type: "string", default: "24" },
  rounds: { type: "string", default: "5" },
  sides: { type: "string", default: "before,after" },
  json: { type: "boolean", default: false },
});
const steps = positive("steps", values.steps!);
const rounds = positive("rounds", values.rounds!);
const sides = values.sides!.split(",");
if (!sides.length || sides.some((s) => s !== "before" && s !== "after")) {
  fail(`--sides: expected before and/or after, got ${values.sides}`);
}
const withBefore = sides.includes("before");

/** The baseline's sources, from git, in a temporary directory. */
async function extract(rev: string): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix: "fusedge-baseline-" });
  const archive = new Deno.Command("git", {
    args: ["-C", root, "archive", "--format=tar", rev, "src", "kernels"],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const untar = new Deno.Command("tar", { args: ["-x", "-C", dir], stdin: "piped" }).spawn();
  await archive.stdout.pipeTo(untar.stdin);
  const [a, u] = await Promise.all([archive.output(), untar.status]);
  if (!a.success || !u.success) {
    fail(`--baseline ${rev}: git archive failed: ${new TextDecoder().decode(a.stderr)}`);
  }
  return dir;
}

const device = await resolveDevice("webgpu").catch((e) => fail(`a WebGPU adapter is needed: ${e.message}`));
const assets = await loadAssets(values.model!).catch((e) => fail(`--model ${values.model}: ${e.message}`));
const graph = await resolveGraphOptions("auto", "none", device);
const prompt = assets.tokenizer.encode("import os\nimport sys\n\ndef main(");
const vocab = assets.checkpoint.config.vocabSize;

const baseDir = withBefore ? await extract(values.baseline!) : null;
const base = baseDir
  ? {
    engine: await import(join(baseDir, "src/runtime/engine.ts")),
    picker: await import(join(baseDir, "src/runtime/gpu_decode.ts")),
  }
  : null;
const old = base
  ? await base.engine.buildInstance(await base.engine.loadAssets(values.model!), UNFUSED, "webgpu", graph)
  : null;
const now = await buildInstance(assets, UNFUSED, device, graph, undefined, undefined, { slots: 1 });

interface Round {
  host: number;
  nodes: number;
  dispatches: number;
  submits: number;
  readbacks: number;
  bindGroups: number;
  writes: number;
}

/** Milliseconds spent waiting for zero-delay timers: the baseline's event-loop turns, left out of its host time. */
let timerMs = 0;
function countTimers(): () => void {
  const original = globalThis.setTimeout;
  // deno-lint-ignore no-explicit-any
  globalThis.setTimeout = ((fn: (...a: any[]) => void, delay?: number, ...args: any[]) => {
    if (delay) return original(fn, delay, ...args);
    const t0 = performance.now();
    return original(
      (...a: unknown[]) => {
        timerMs += performance.now() - t0;
        fn(...a);
      },
      0,
      ...args,
    );
  }) as typeof setTimeout;
  return () => (globalThis.setTimeout = original);
}

/** The baseline's GPU-resident single-sequence loop: a session run and an argmax dispatch a token. */
async function before(): Promise<Round> {
  const s = old.session;
  const picker = await base!.picker.GpuTokenPicker.create(s, {
    temperature: 0,
    seed: 1,
    maxSteps: steps + 3,
  });
  let r = await s.stepTensor(prompt, s.emptyCache());
  let cache = r.cache;
  picker.pick(r.logits.gpuBuffer, prompt.length - 1, vocab);
  r.logits.dispose();
  const counters = new GpuCounters();
  const host: number[] = [];
  const totals = { dispatches: 0, submits: 0, readbacks: 0, bindGroups: 0, writes: 0 };
  counters.install();
  const restoreTimers = countTimers();
  try {
    for (let k = 0; k < steps + 2; k++) {
      counters.reset();
      const w0 = timerMs;
      const t0 = performance.now();
      r = await s.stepTensor(picker.nextIds, cache);
      cache = r.cache;
      picker.pick(r.logits.gpuBuffer, 0, vocab);
      r.logits.dispose();
      const c = counters.reset();
      if (k < 2) continue;
      host.push(performance.now() - t0 - c.submitMs - (timerMs - w0));
      for (const key of Object.keys(totals) as (keyof typeof totals)[]) totals[key] += c[key];
    }
  } finally {
    restoreTimers();
    counters.uninstall();
  }
  await picker.readBack(0, steps + 3);
  picker.destroy();
  for (const t of cache.tensors.values()) t.dispose?.();
  const per = (n: number) => n / steps;
  return {
    host: spread(host).median,
    nodes: old.session.graph.nodeCount,
    dispatches: per(totals.dispatches),
    submits: per(totals.submits),
    readbacks: per(totals.readbacks),
    bindGroups: per(totals.bindGroups),
    writes: per(totals.writes),
  };
}

async function after(): Promise<Round> {
  const p = await profileSteps(now, prompt, 1, steps);
  return {
    host: p.host_ms.median,
    nodes: p.nodes,
    dispatches: p.dispatches!,
    submits: p.submits!,
    readbacks: p.readbacks!,
    bindGroups: p.bind_groups!,
    writes: p.writes!,
  };
}

if (withBefore) await before();
await after();
const samples = { before: [] as Round[], after: [] as Round[] };
for (let round = 0; round < rounds; round++) {
  const order = round % 2 ? ["after", "before"] as const : ["before", "after"] as const;
  for (const side of order.filter((s) => sides.includes(s))) {
    samples[side].push(side === "before" ? await before() : await after());
  }
}
const ratio = samples.before.map((b, i) => b.host / samples.after[i].host);
const summary = (rs: Round[]) =>
  rs.length === 0 ? null : ({
    host_ms: spread(rs.map((r) => r.host)),
    nodes: rs[0].nodes,
    dispatches: rs[0].dispatches,
    submits: rs[0].submits,
    readbacks: rs[0].readbacks,
    bind_groups: rs[0].bindGroups,
    writes: rs[0].writes,
  });
const report = {
  date: new Date().toISOString(),
  model: assets.name,
  dtype: graph.dtype,
  baseline: values.baseline,
  steps,
  rounds,
  before: summary(samples.before),
  after: summary(samples.after),
  host_ms_ratio: ratio.length ? spread(ratio) : null,
};
await old?.session.release();
await now.release();
if (baseDir) await Deno.remove(baseDir, { recursive: true });

const sp = (s: Spread) => `${s.median.toFixed(2)} [${s.min.toFixed(2)}-${s.max.toFixed(2)}]`;
if (values.json) console.log(JSON.stringify(report, null, 2));
else {
  console.log(
    `host ms per decode step, ${report.model} ${graph.dtype} on WebGPU at batch 1, ${steps} steps a round, ` +
      `${rounds} alternating rounds (median [min-max] of the rounds' medians)`,
  );
  console.log("side     nodes  dispatches  submits  readbacks  bind groups  writes  host ms");
  for (const side of ["before", "after"] as const) {
    const s = report[side];
    if (!s) continue;
    console.log([
      side.padEnd(7),
      String(s.nodes).padStart(6),
      s.dispatches.toFixed(0).padStart(11),
      s.submits.toFixed(0).padStart(8),
      s.readbacks.toFixed(2).padStart(10),
      s.bind_groups.toFixed(0).padStart(12),
      s.writes.toFixed(0).padStart(7),
      " " + sp(s.host_ms),
    ].join(" "));
  }
  if (report.host_ms_ratio) console.log(`before/after: ${sp(report.host_ms_ratio)}x`);
}
Deno.exit(0);
