/**
 * Measures Gauss-Newton steps on the KL of the final logits as a healing objective for one fused FFN
 * group (issue 13's last untried objective; docs/fusion.md, "Healing without training"): the variables are the
 * group's wide down projection W; the teacher is the unfused model. Each step runs the model over the
 * calibration windows, takes the KL's gradient g_t at the group's output through the layers after it
 * (model/backward.ts), and solves
 *
 *   min ||(dW a_t - delta_t) / r_t||^2 + lambda ||dW||^2,  delta_t = -r_t^2 g_t,
 *
 * where r_t is the rms of the unfused stream after the group: the next RMSNorm's Jacobian scales a
 * displacement by 1/r_t, so its Gauss-Newton metric is ~ I / r_t^2 and the per-token Newton step ~ r_t^2
 * g_t. The rows a_t / r_t are the inputs of heal's down stage, so the Gram is accumulated once and
 * factored once per ridge. The step length eta (and the ridge) is chosen on held-out loss; a step that
 * lowers nothing ends the run. Held-out and evaluation losses are onnxruntime-web WASM fp32.
 *
 *   scripts/deno run -A bench/studies/heal_logits.ts [--model DIR] [--group 3-8] [--from fused|healed]
 *     [--calibration-tokens 4096] [--skip-tokens 65536] [--heldout-tokens 1024] [--eval-tokens 8192]
 *     [--steps 3] [--ridges 0.1,1,10] [--etas 0.008,...,0.512] [--json]
 *
 * `--from healed` first heals the group with heal's own stages on the same slices (fusion/heal.ts).
 */
import { join } from "node:path";
import { fail, groupPlan, layerRange, positive, scriptFlags } from "../../scripts/args.ts";
import { fileURLToPath } from "node:url";
import { applyPlan } from "../../src/fusion/apply.ts";
import { textSlices } from "../../src/fusion/calibration.ts";
import { evaluateQuality } from "../../src/fusion/evaluate.ts";
import { healPlan } from "../../src/fusion/heal.ts";
import { healRunner } from "../../src/instance/heal_runner.ts";
import { type CholeskyFactor, NormalEquations } from "../../src/fusion/linear_fit.ts";
import { streamGradient } from "./backward.ts";
import type { Block, FfnBlock } from "../../src/model/blocks.ts";
import { linear, referenceForward, swigluActivations } from "../../src/model/forward.ts";
import { tensor } from "../../src/model/tensor.ts";
import { loadAssets } from "../../src/instance/build.ts";
import { withScoringSession } from "../../src/ort/session.ts";

const root = fileURLToPath(new URL("../..", import.meta.url));
const values = scriptFlags({
  model: { type: "string", default: join(root, "models", "tiny-nas") },
  group: { type: "string", default: "3-8" },
  from: { type: "string", default: "fused" },
  "calibration-tokens": { type: "string", default: "4096" },
  "skip-tokens": { type: "string", default: "65536" },
  "heldout-tokens": { type: "string", default: "1024" },
  "eval-tokens": { type: "string", default: "8192" },
  steps: { type: "string", default: "3" },
  ridges: { type: "string", default: "0.1,1,10" },
  etas: { type: "string", default: "0.008,0.016,0.032,0.064,0.128,0.256,0.512" },
  json: { type: "boolean", default: false },
});
const count = (name: keyof typeof values) => positive(name, values[name] as string);
const list = (name: "ridges" | "etas") =>
  (values[name] as string).split(",").map((v) => positive(name, v, false));
const layers = layerRange(values.group!);
const [first, last] = [layers[0], layers.at(-1)!];
if (values.from !== "fused" && values.from !== "healed") fail(`--from: fused or healed, got ${values.from}`);
const steps = count("steps");
const ridges = list("ridges");
const etas = list("etas").sort((a, b) => a - b);
const calibrationTokens = count("calibration-tokens");
const skip = Number(values["skip-tokens"]);
if (!Number.isInteger(skip) || skip < 0) {
  fail(`--skip-tokens: expected a whole number, got ${values["skip-tokens"]}`);
}
const heldoutTokens = count("heldout-tokens");

const text = join(root, "data", "eval.py.txt");
const assets = await loadAssets(values.model!, {}, text).catch((e) =>
  fail(`--model: ${(e as Error).message}`)
);
const ckpt = assets.checkpoint;
const cfg = ckpt.config;
const { hidden: d, rmsEps: eps, vocabSize: vocab } = cfg;
const plan = groupPlan(layers, cfg);
const window = Math.min(256, cfg.maxPositions);
const [calibration, heldout, evaluation] = await textSlices(text, assets.tokenizer, [
  { skip, max: calibrationTokens, window },
  { skip: skip + calibrationTokens, max: heldoutTokens, window },
  { skip: 512, max: count("eval-tokens"), window },
]);
if (!calibration.length || !heldout.length) fail("the text has too few tokens after --skip-tokens");

const progress = (line: string) => console.error(`heal_logits: ${line}`);
let variants = 0;
const runner = healRunner(ckpt, heldout);
const heldoutLoss = async (blocks: Block[]) => {
  const losses = await runner.lossesOf(blocks);
  return losses.reduce((a, b) => a + b, 0) / losses.length;
};
const evalLoss = async (blocks: Block[]) =>
  (await withScoringSession(
    ckpt,
    blocks,
    (s) => evaluateQuality(evaluation, vocab, (ids) => s.logitsOf(ids)),
  ))
    .loss;

const heal = values.from === "healed"
  ? (await healPlan({
    ckpt,
    blocks: assets.blocks,
    plan: {
      ...plan,
      heal: { calibration_tokens: calibrationTokens, skip_tokens: skip, heldout_tokens: heldoutTokens },
    },
    fits: new Map(),
    calibration,
    heldout,
    ...runner,
    onProgress: (stage, done, total) => progress(`${stage} ${done}/${total}`),
  })).heal
  : undefined;
let model = applyPlan(assets.blocks, plan, "fused", new Map(), heal);
const at = model.findIndex((b) => b.kind === "ffn" && b.layers.length > 1);
let fused = model[at] as FfnBlock;
const width = fused.down.shape[1];
const withDown = (w: Float32Array): Block[] =>
  model.map((
    b,
    i,
  ) => (i === at ? { ...fused, down: tensor([d, width], w), variant: `gauss-newton-${variants++}` } : b));

// The teacher's probabilities, r_t after the group in the unfused stream, and the group's input (fixed:
// the group's own weights do not change it).
const lastBlock = assets.blocks.findIndex((b) => b.kind === "ffn" && b.layers[0] === last);
const teacher: Float32Array[] = [];
const rms: Float64Array[] = [];
const inputs: Float64Array[] = [];
for (const [w, ids] of calibration.entries()) {
  const t = ids.length;
  const r = new Float64Array(t);
  const { logits } = referenceForward(ckpt, assets.blocks, ids, {
    onDelta: (i, delta, input) => {
      if (i !== lastBlock) return;
      for (let row = 0; row < t; row++) {
        let ss = 0;
        for (let c = 0; c < d; c++) ss += (input[row * d + c] + delta[row * d + c]) ** 2;
        r[row] = Math.sqrt(ss / d + eps);
      }
    },
  });
  teacher.push(softmaxRows(logits, t));
  rms.push(r);
  referenceForward(ckpt, model, ids, {
    logits: "none",
    onDelta: (i, _delta, input) => i === at && inputs.push(input),
  });
  progress(`teacher and group inputs ${w + 1}/${calibration.length}`);
}

function softmaxRows(z: Float64Array, t: number): Float32Array {
  const p = new Float32Array(z.length);
  for (let row = 0; row < t; row++) {
    const o = row * vocab;
    let max = -Infinity;
    for (let v = 0; v < vocab; v++) max = Math.max(max, z[o + v]);
    let sum = 0;
    for (let v = 0; v < vocab; v++) sum += Math.exp(z[o + v] - max);
    const lse = max + Math.log(sum);
    for (let v = 0; v < vocab; v++) p[o + v] = Math.exp(z[o + v] - lse);
  }
  return p;
}

const unfusedEval = await evalLoss(assets.blocks);
const fusedEval = await evalLoss(applyPlan(assets.blocks, plan, "fused"));
const gap = (loss: number) => (fusedEval - loss) / (fusedEval - unfusedEval);
let current = { heldout: await heldoutLoss(model), eval: await evalLoss(model) };
const report = {
  model: assets.name,
  group: layers,
  from: values.from,
  calibration_tokens: calibration.reduce((n, w) => n + w.length, 0),
  eval: { unfused: unfusedEval, fused: fusedEval },
  start: { ...current, gap_closed: gap(current.eval) },
  steps: [] as {
    calibration_kl: number;
    tried: { ridge: number; eta: number; heldout: number }[];
    kept: { ridge: number; eta: number } | null;
    heldout: number;
    eval: number;
    gap_closed: number;
    seconds: number;
  }[],
};
const line = (what: string, r: { heldout: number; eval: number }) =>
  `${what}: held-out ${r.heldout.toFixed(4)}, evaluation ${r.eval.toFixed(4)}, gap closed ${
    (100 * gap(r.eval)).toFixed(1)
  }%`;
if (!values.json) {
  console.log(
    `${assets.name} ffn[${first}-${last}] from ${values.from}; evaluation loss unfused ${
      unfusedEval.toFixed(4)
    }, fused ${fusedEval.toFixed(4)}`,
  );
  console.log(line("start", current));
}

const eq = new NormalEquations(width, d);
const factors = new Map<number, CholeskyFactor>();
let W: Float32Array = Float32Array.from(fused.down.data);
for (let step = 0; step < steps; step++) {
  const t0 = performance.now();
  const cross = new Float64Array(width * d);
  let kl = 0;
  let tokens = 0;
  for (const [w, ids] of calibration.entries()) {
    const t = ids.length;
    const a = swigluActivations(inputs[w], fused, t, d, eps);
    const out = linear(a, tensor([d, width], W), t);
    for (let i = 0; i < out.length; i++) out[i] += inputs[w][i];
    const p = teacher[w];
    const g = streamGradient(ckpt, model, ids, { block: at + 1, x: out }, (z) => {
      const q = softmaxRows(z, t);
      const dz = new Float64Array(z.length);
      for (let i = 0; i < z.length; i++) {
        dz[i] = q[i] - p[i];
        if (p[i] > 0) kl += p[i] * Math.log(p[i] / Math.max(q[i], 1e-30));
      }
      tokens += t;
      return dz;
    });
    const r = rms[w];
    const y = new Float64Array(t * d);
    for (let row = 0; row < t; row++) {
      for (let c = 0; c < d; c++) y[row * d + c] = -r[row] * g[row * d + c];
      for (let u = 0; u < width; u++) a[row * width + u] /= r[row];
    }
    if (step === 0) eq.add(t, a, y);
    else eq.crossOf(t, a, y, cross);
    progress(`step ${step + 1}: gradients ${w + 1}/${calibration.length}`);
  }
  const rhs = step === 0 ? eq.cross : cross;
  const tried: { ridge: number; eta: number; heldout: number }[] = [];
  let best: { ridge: number; eta: number; heldout: number; w: Float32Array } | null = null;
  for (const ridge of ridges) {
    if (!factors.has(ridge)) factors.set(ridge, eq.factor(ridge));
    const dw = factors.get(ridge)!.solve(rhs);
    let previous = Infinity;
    for (const eta of etas) {
      const w = Float32Array.from(W, (v, i) => v + eta * dw[i]);
      const heldout = await heldoutLoss(withDown(w));
      tried.push({ ridge, eta, heldout });
      progress(`step ${step + 1}: ridge ${ridge} eta ${eta}: held-out ${heldout.toFixed(4)}`);
      if (heldout < (best?.heldout ?? current.heldout)) best = { ridge, eta, heldout, w };
      // Past the minimum along this direction: longer steps only get worse.
      if (heldout > previous) break;
      previous = heldout;
    }
  }
  if (best) {
    W = best.w;
    model = withDown(W);
    fused = model[at] as FfnBlock;
    current = { heldout: best.heldout, eval: await evalLoss(model) };
  }
  const seconds = (performance.now() - t0) / 1000;
  report.steps.push({
    calibration_kl: kl / tokens,
    tried,
    kept: best && { ridge: best.ridge, eta: best.eta },
    ...current,
    gap_closed: gap(current.eval),
    seconds,
  });
  if (!values.json) {
    console.log(
      line(
        `step ${step + 1} (calibration KL ${(kl / tokens).toFixed(4)}; ${
          best ? `ridge ${best.ridge}, eta ${best.eta}` : "no step lowered the held-out loss"
        }; ${seconds.toFixed(0)} s)`,
        current,
      ),
    );
  }
  if (!best) break;
}
if (values.json) console.log(JSON.stringify(report));
