/**
 * What healing's data gathering costs, on this machine, float64 JS against onnxruntime's WASM backend or
 * WebGPU (instance/heal_runner.ts, what healing uses), for one of its two fits of a fused FFN group:
 * - `--stage down` (default): the residual streams of the group's sequential run and its down
 *   projection's normal equations, through the float64 reference (the JS forward and the JS Gram
 *   accumulation healing used before) against onnxruntime;
 * - `--stage inputs`: the member-input fit's normal equations alone, from the same streams (gathered once
 *   through onnxruntime, outside the timing): the float64 JS accumulation against the statistics graph.
 *   It needs no float64 forward, so it runs at a real model's hidden size (a synthetic checkpoint).
 * Both sides are warmed, then alternated in rounds; per 1024 tokens, wall and CPU seconds as median
 * [min-max], and how far the two sides' normal equations differ (fp32 gathering against float64).
 *
 *   scripts/deno run -A bench/studies/heal_gather.ts [--model DIR] [--group 3-8] [--stage down|inputs]
 *     [--windows 4] [--rounds 3] [--device wasm|webgpu] [--json]
 */
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { fail, groupPlan, layerRange, positive, scriptFlags } from "../../scripts/args.ts";
import { cpuSeconds } from "../../src/bench/decode_bench.ts";
import { textWindows } from "../../src/fusion/calibration.ts";
import { applyPlan } from "../../src/fusion/apply.ts";
import { type GroupIo, memberInputRows, scaledRows } from "../../src/fusion/heal.ts";
import { NormalEquations } from "../../src/fusion/linear_fit.ts";
import type { FfnBlock } from "../../src/model/blocks.ts";
import { linear, referenceForward, swigluActivations } from "../../src/model/forward.ts";
import { relL2, type Spread, spread } from "../../src/numeric.ts";
import { loadAssets } from "../../src/instance/build.ts";
import { healRunner } from "../../src/instance/heal_runner.ts";
import type { Device } from "../../src/ort/ort.ts";

const root = fileURLToPath(new URL("../..", import.meta.url));
const values = scriptFlags({
  model: { type: "string", default: join(root, "models", "tiny-nas") },
  group: { type: "string", default: "3-8" },
  stage: { type: "string", default: "down" },
  windows: { type: "string", default: "4" },
  rounds: { type: "string", default: "3" },
  device: { type: "string", default: "wasm" },
  json: { type: "boolean", default: false },
});
const windowCount = positive("windows", values.windows!);
const device = values.device as Device;
if (device !== "wasm" && device !== "webgpu") fail(`--device: wasm or webgpu, got ${values.device}`);
const rounds = positive("rounds", values.rounds!);
const stage = values.stage!;
if (stage !== "down" && stage !== "inputs") fail(`--stage: down or inputs, got ${stage}`);
const layers = layerRange(values.group!);

const assets = await loadAssets(values.model!).catch((e) =>
  fail(`--model ${values.model}: ${(e as Error).message}`)
);
const ckpt = assets.checkpoint;
const { hidden: d, rmsEps: eps } = ckpt.config;
const plan = groupPlan(layers, ckpt.config);
const fused = applyPlan(assets.blocks, plan, "fused", new Map()).find((b) =>
  b.kind === "ffn" && b.layers.length > 1
) as FfnBlock;
const width = fused.gate.shape[0];
/** The streams entering each member's FFN: the group's input, then the member inputs' taps. */
const members = layers.map((l) => assets.blocks.findIndex((b) => b.kind === "ffn" && b.layers[0] === l));
const first = members[0];
const last = members.at(-1)!;
const windows = await textWindows(join(root, "data", "eval.py.txt"), assets.tokenizer, {
  skip: 65536,
  max: 256 * windowCount,
  window: Math.min(256, ckpt.config.maxPositions),
});
const tokens = windows.reduce((n, w) => n + w.length, 0);

/** The float64 reference: the JS forward's streams, the rows in float64, the JS Gram. */
function reference(): NormalEquations {
  const eq = new NormalEquations(width, d);
  for (const ids of windows) {
    let x: Float64Array | null = null;
    let out: Float64Array | null = null;
    referenceForward(ckpt, assets.blocks.slice(0, last + 1), ids, {
      logits: "none",
      onDelta: (i, delta, input) => {
        if (i === first) x = input;
        if (i === last) out = input.map((v, k) => v + delta[k]);
      },
    });
    const t = ids.length;
    const io = { t, x: Float32Array.from(x!), out: Float32Array.from(out!) };
    const a = swigluActivations(Float64Array.from(x!), fused, t, d, eps);
    const { y } = scaledRows(io, a, linear(a, fused.down, t), eps);
    eq.add(t, a, y);
  }
  return eq;
}

/** Healing's path: the streams and the statistics through onnxruntime, summed in float64. */
async function onnxruntime(): Promise<NormalEquations> {
  const runner = healRunner(ckpt, [], device);
  const io: GroupIo[] = [];
  await runner.streams(assets.blocks, windows, [first, last + 1], (w, [x, out]) => {
    io[w] = { t: windows[w].length, x, out };
  });
  const eq = new NormalEquations(width, d);
  await runner.downStatistics(fused, io, (w, s) => eq.addStatistics(io[w].t, s.gram, s.cross, s.squares));
  return eq;
}

const memberStreams: Float32Array[][] = [];
if (stage === "inputs") {
  await healRunner(ckpt, [], device).streams(assets.blocks, windows, members, (w, streams) => {
    memberStreams[w] = streams;
  });
}

/** The member-input fit's normal equations in float64 JS, as healing accumulated them before. */
function inputsReference(): NormalEquations {
  const eq = new NormalEquations(d, (layers.length - 1) * d);
  for (const [w, [x, ...inputs]] of memberStreams.entries()) {
    const { h, y } = memberInputRows(x, inputs, windows[w].length, eps);
    eq.add(windows[w].length, h, y);
  }
  return eq;
}

/** The same through onnxruntime's statistics graph, summed in float64. */
function inputsOnnxruntime(): Promise<NormalEquations> {
  const eq = new NormalEquations(d, (layers.length - 1) * d);
  return healRunner(ckpt, [], device).inputStatistics(layers.length, async (of) => {
    for (const [w, [x, ...inputs]] of memberStreams.entries()) {
      const s = await of(x, inputs);
      eq.addStatistics(windows[w].length, s.gram, s.cross, s.squares);
    }
    return eq;
  });
}

const sides = stage === "down"
  ? { reference: () => Promise.resolve(reference()), onnxruntime }
  : { reference: () => Promise.resolve(inputsReference()), onnxruntime: inputsOnnxruntime };
type Side = keyof typeof sides;
const names = Object.keys(sides) as Side[];
const results = new Map<Side, NormalEquations>();
const sample = async (side: Side) => {
  const cpu0 = cpuSeconds();
  const t0 = performance.now();
  results.set(side, await sides[side]());
  const per = 1024 / tokens;
  return { s: ((performance.now() - t0) / 1000) * per, cpu: (cpuSeconds() - cpu0) * per };
};
for (const side of names) await sample(side);
const samples = new Map(names.map((n) => [n, [] as { s: number; cpu: number }[]]));
for (let round = 0; round < rounds; round++) {
  for (const side of round % 2 ? [...names].reverse() : names) samples.get(side)!.push(await sample(side));
}
const [ref, ort] = [results.get("reference")!, results.get("onnxruntime")!];
const report = {
  model: assets.name,
  device,
  group: layers,
  stage,
  hidden: d,
  width,
  tokens,
  rounds,
  per_1024_tokens: Object.fromEntries(
    names.map((n) => [n, {
      seconds: spread(samples.get(n)!.map((x) => x.s)),
      cpu_seconds: spread(samples.get(n)!.map((x) => x.cpu)),
    }]),
  ),
  speedup: spread(
    samples.get("reference")!.map((r, i) => r.s / samples.get("onnxruntime")![i].s),
  ),
  difference: { gram: relL2(ort.gram, ref.gram), cross: relL2(ort.cross, ref.cross) },
};
if (values.json) {
  console.log(JSON.stringify(report, null, 1));
} else {
  const f = (s: Spread, digits = 2) =>
    `${s.median.toFixed(digits)} [${s.min.toFixed(digits)}-${s.max.toFixed(digits)}]`;
  console.log(
    `healing's gathering for ffn[${values.group}] (width ${width}, hidden ${d}) of ${assets.name}, ${
      stage === "down" ? "streams and down-projection statistics" : "member-input statistics alone"
    }: ${tokens} tokens a sample, ` +
      `sides alternated in ${rounds} rounds after a warm-up; per 1024 tokens, median [min-max]`,
  );
  console.log(`onnxruntime on ${device}`);
  console.log("side          seconds              CPU seconds");
  for (const n of names) {
    const p = report.per_1024_tokens[n];
    console.log(`${n.padEnd(13)} ${f(p.seconds).padEnd(20)} ${f(p.cpu_seconds)}`);
  }
  console.log(`onnxruntime over reference: ${f(report.speedup)}x (ratio of each round's samples)`);
  console.log(
    `normal equations, onnxruntime against float64: Gram ${report.difference.gram.toExponential(1)}, ` +
      `cross products ${report.difference.cross.toExponential(1)} relative`,
  );
}
