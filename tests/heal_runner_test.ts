import assert from "node:assert/strict";
import { applyPlan } from "../src/fusion/apply.ts";
import { NormalEquations } from "../src/fusion/linear_fit.ts";
import { memberInputRows, scaledRows } from "../src/fusion/heal.ts";
import { tokenLosses } from "../src/fusion/evaluate.ts";
import { validatePlan } from "../src/fusion/plan.ts";
import { type FfnBlock, unfusedBlocks } from "../src/model/blocks.ts";
import { loadCheckpoint } from "../src/model/checkpoint.ts";
import { linear, referenceForward, swigluActivations } from "../src/model/forward.ts";
import { tensor } from "../src/model/tensor.ts";
import { rng } from "../src/numeric.ts";
import { healRunner } from "../src/instance/heal_runner.ts";
import { HAS_NATIVE, HAS_WEBGPU, relL2, runScript, TINY_LLAMA, TINY_NAS } from "./helpers.ts";

const windowsOf = (vocab: number, lengths: number[]) => {
  const random = rng(3);
  return lengths.map((n) => Array.from({ length: n }, () => Math.floor(random() * vocab)));
};

for (const device of ["wasm", "webgpu", "cpu"] as const) {
  Deno.test({
    name:
      `heal runner on ${device}: residual streams gathered through onnxruntime are the float64 reference's (1e-3), through every block kind, up to after the last block`,
    ignore: (device === "webgpu" && !HAS_WEBGPU) || (device === "cpu" && !HAS_NATIVE),
    sanitizeResources: false,
    sanitizeOps: false,
    fn: async () => {
      const ckpt = await loadCheckpoint(TINY_LLAMA);
      const d = ckpt.config.hidden;
      const random = rng(4);
      const fits = new Map([[4, {
        norm: Float32Array.from({ length: d }, () => 0.5 + random()),
        weight: tensor([d, d], Float32Array.from({ length: d * d }, () => (random() - 0.5) * 0.1)),
      }]]);
      const plan = validatePlan({
        version: 2,
        attention: { remove: [3], linear: [4] },
        ffn_groups: [[2, 3]],
        block_groups: [[5, 6]],
      }, ckpt.config);
      const blocks = applyPlan(unfusedBlocks(ckpt), plan, "fused", fits);
      const kinds = new Set(blocks.map((b) => b.kind));
      for (const k of ["attention", "ffn", "linear", "parallel_blocks"]) assert.ok(kinds.has(k as never), k);
      const windows = windowsOf(ckpt.config.vocabSize, [40, 17]);
      const taps = [0, 3, blocks.length - 1, blocks.length];
      const gathered: Float32Array[][] = [];
      await healRunner(ckpt, [], device).streams(blocks, windows, taps, (w, s) => {
        gathered[w] = s;
      });
      assert.equal(gathered.length, windows.length);
      for (const [w, ids] of windows.entries()) {
        const inputs = new Map<number, Float64Array>();
        const { hidden } = referenceForward(ckpt, blocks, ids, {
          logits: "none",
          onDelta: (i, _delta, input) => inputs.set(i, input),
        });
        inputs.set(blocks.length, hidden);
        taps.forEach((i, j) => {
          assert.equal(gathered[w][j].length, ids.length * d);
          const err = relL2(gathered[w][j], inputs.get(i)!);
          assert.ok(err < 1e-3, `window ${w}, stream entering block ${i}: ${err}`);
        });
      }
      // A tap past the last block is a caller's mistake, not a shorter graph.
      await assert.rejects(
        () => healRunner(ckpt, [], device).streams(blocks, windows, [blocks.length + 1], () => {}),
        /outside/,
      );
    },
  });

  Deno.test({
    name:
      `heal runner on ${device}: candidates' held-out losses (scored on the runner's device) equal the float64 reference's (1e-3)`,
    ignore: (device === "webgpu" && !HAS_WEBGPU) || (device === "cpu" && !HAS_NATIVE),
    sanitizeResources: false,
    sanitizeOps: false,
    fn: async () => {
      const ckpt = await loadCheckpoint(TINY_NAS);
      const heldout = windowsOf(ckpt.config.vocabSize, [40, 25]);
      const blocks = applyPlan(
        unfusedBlocks(ckpt),
        validatePlan({ ffn_groups: [[3, 4, 5]] }, ckpt.config),
        "fused",
        new Map(),
      );
      const losses = await healRunner(ckpt, heldout, device).lossesOf(blocks);
      const reference = await tokenLosses(
        heldout,
        ckpt.config.vocabSize,
        (ids) => Promise.resolve(Float32Array.from(referenceForward(ckpt, blocks, ids).logits)),
      );
      assert.equal(losses.length, 39 + 24);
      assert.ok(relL2(losses, reference) < 1e-3, `losses ${relL2(losses, reference)}`);
    },
  });

  Deno.test({
    name:
      `heal runner on ${device}: the down projection's statistics from onnxruntime (Gram, cross products, squares of the 1/rms-scaled rows) equal the float64 rows' normal equations`,
    ignore: (device === "webgpu" && !HAS_WEBGPU) || (device === "cpu" && !HAS_NATIVE),
    sanitizeResources: false,
    sanitizeOps: false,
    fn: async () => {
      const ckpt = await loadCheckpoint(TINY_NAS);
      const { hidden: d, rmsEps: eps } = ckpt.config;
      const plan = validatePlan({ ffn_groups: [[3, 4, 5]] }, ckpt.config);
      const blocks = applyPlan(unfusedBlocks(ckpt), plan, "fused", new Map());
      const at = blocks.findIndex((b) => b.kind === "ffn" && b.layers.length === 3);
      const fused = blocks[at] as FfnBlock;
      const width = fused.gate.shape[0];
      const windows = windowsOf(ckpt.config.vocabSize, [48, 30]);
      // The sequential group's input and output, as healing reads them.
      const sequential = unfusedBlocks(ckpt);
      const first = sequential.findIndex((b) => b.kind === "ffn" && b.layers[0] === 3);
      const last = sequential.findIndex((b) => b.kind === "ffn" && b.layers[0] === 5);
      const io: { t: number; x: Float32Array; out: Float32Array }[] = [];
      await healRunner(ckpt, [], device).streams(
        sequential,
        windows,
        [first, last + 1],
        (w, [x, out]) => {
          io[w] = { t: windows[w].length, x, out };
        },
      );
      const fromOrt = new NormalEquations(width, d);
      await healRunner(ckpt, [], device).downStatistics(fused, io, (w, s) => {
        assert.equal(s.gram.length, width * width);
        fromOrt.addStatistics(io[w].t, s.gram, s.cross, s.squares);
      });
      const reference = new NormalEquations(width, d);
      for (const { t, x, out } of io) {
        const a = swigluActivations(Float64Array.from(x), fused, t, d, eps);
        const predicted = linear(a, fused.down, t);
        const { y } = scaledRows({ t, x, out }, a, predicted, eps);
        reference.add(t, a, y);
      }
      assertSameEquations(fromOrt, reference);
    },
  });

  Deno.test({
    name:
      `heal runner on ${device}: the member inputs' statistics from onnxruntime (norm(x) against norm(x_j) - norm(x)) equal the float64 rows' normal equations`,
    ignore: (device === "webgpu" && !HAS_WEBGPU) || (device === "cpu" && !HAS_NATIVE),
    sanitizeResources: false,
    sanitizeOps: false,
    fn: async () => {
      const ckpt = await loadCheckpoint(TINY_NAS);
      const { hidden: d, rmsEps: eps } = ckpt.config;
      const blocks = unfusedBlocks(ckpt);
      const members = [3, 4, 5].map((l) => blocks.findIndex((b) => b.kind === "ffn" && b.layers[0] === l));
      const windows = windowsOf(ckpt.config.vocabSize, [48, 30]);
      const runner = healRunner(ckpt, [], device);
      const fromOrt = new NormalEquations(d, 2 * d);
      const reference = new NormalEquations(d, 2 * d);
      await runner.inputStatistics(
        3,
        (of) =>
          runner.streams(blocks, windows, members, async (w, [x, ...inputs]) => {
            const t = windows[w].length;
            const s = await of(x, inputs);
            assert.equal(s.cross.length, d * 2 * d);
            fromOrt.addStatistics(t, s.gram, s.cross, s.squares);
            const { h, y } = memberInputRows(x, inputs, t, eps);
            reference.add(t, h, y);
          }),
      );
      assertSameEquations(fromOrt, reference);
    },
  });
}

/** Normal equations gathered in fp32 windows match float64 ones: Gram (upper triangle), cross, squares, a fit. */
function assertSameEquations(fromOrt: NormalEquations, reference: NormalEquations) {
  const n = fromOrt.dIn;
  assert.equal(fromOrt.rows, reference.rows);
  const upper = (eq: NormalEquations) => eq.gram.filter((_, k) => k % n >= Math.floor(k / n));
  assert.ok(
    relL2(upper(fromOrt), upper(reference)) < 1e-4,
    `Gram ${relL2(upper(fromOrt), upper(reference))}`,
  );
  assert.ok(relL2(fromOrt.cross, reference.cross) < 1e-4, `cross ${relL2(fromOrt.cross, reference.cross)}`);
  assert.ok(Math.abs(fromOrt.targetSquares / reference.targetSquares - 1) < 1e-4);
  // The lower triangle is never read: it stays zero.
  assert.equal(fromOrt.gram[n], 0);
  // And the same ridge fit follows from either.
  assert.ok(relL2(fromOrt.solve(0.1), reference.solve(0.1)) < 1e-3);
}

Deno.test({
  name:
    "bench/studies/heal_gather.ts: both sides gather the same normal equations, for either stage, and are timed; bad flags exit 2",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const run = (...args: string[]) => runScript("bench/studies/heal_gather.ts", ...args);
    const r = await run("--group", "7-8", "--windows", "1", "--rounds", "1", "--json");
    assert.equal(r.code, 0, r.stderr);
    const report = JSON.parse(r.stdout);
    assert.equal(report.width, 1536);
    assert.equal(report.tokens, 256);
    for (const side of ["reference", "onnxruntime"]) {
      assert.ok(report.per_1024_tokens[side].seconds.median > 0, side);
    }
    assert.ok(
      report.difference.gram < 1e-4 && report.difference.cross < 1e-4,
      JSON.stringify(report.difference),
    );
    const inputs = await run(
      "--group",
      "6-8",
      "--stage",
      "inputs",
      "--windows",
      "1",
      "--rounds",
      "1",
      "--json",
    );
    assert.equal(inputs.code, 0, inputs.stderr);
    const inputsReport = JSON.parse(inputs.stdout);
    assert.equal(inputsReport.stage, "inputs");
    assert.ok(inputsReport.per_1024_tokens.onnxruntime.seconds.median > 0);
    assert.ok(
      inputsReport.difference.gram < 1e-4 && inputsReport.difference.cross < 1e-4,
      JSON.stringify(inputsReport.difference),
    );
    for (
      const [args, re] of [
        [["--stage", "up"], /--stage: down or inputs/],
        [["--group", "8-7"], /--group: expected FIRST-LAST/],
        [["--group", "8-9"], /--group: .*layer 9/],
        [["--windows", "0"], /--windows: expected a positive integer/],
        [["--device", "tpu"], /--device: wasm or webgpu/],
        [["--bogus"], /Unknown option '--bogus'/],
      ] as [string[], RegExp][]
    ) {
      const bad = await run(...args);
      assert.equal(bad.code, 2, `${args.join(" ")}: ${bad.stderr}`);
      assert.match(bad.stderr, re);
    }
  },
});
