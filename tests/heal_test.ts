import assert from "node:assert/strict";
import { NormalEquations, residual, ridgeFit } from "../src/fusion/linear_fit.ts";
import { evaluateQuality } from "../src/fusion/evaluate.ts";
import { textWindows } from "../src/fusion/calibration.ts";
import { type FusionPlan, parsePlan, planId } from "../src/fusion/plan.ts";
import { applyPlan } from "../src/fusion/apply.ts";
import type { Block, FfnBlock } from "../src/model/blocks.ts";
import { buildInstance, loadAssets } from "../src/instance/build.ts";
import { join } from "node:path";
import { EVAL_TEXT, exactLinearData, relL2, ROOT, runScript, TINY_LLAMA, TINY_NAS } from "./helpers.ts";
import { clearlyBetter, DOWN_RIDGES, INPUT_RIDGES } from "../src/fusion/heal.ts";
import { rng } from "../src/numeric.ts";
import { post, startServer } from "./server_helpers.ts";

/** A calibration slice far from the evaluation tokens below, small enough for CI. */
const HEAL = { skip_tokens: 65536, calibration_tokens: 1024, heldout_tokens: 1024 };
/** Evaluation tokens: the README's evaluation slice, which the fit never sees. */
const EVAL = { skip: 512, max: 2048, window: 256 };

/** The plan healed with HEAL: its report, and evaluation loss (tokens the fit never saw) unhealed and healed. */
async function healedAgainstPlain(dir: string, plain: FusionPlan) {
  const assets = await loadAssets(dir, {}, EVAL_TEXT);
  const windows = await textWindows(EVAL_TEXT, assets.tokenizer, EVAL);
  const vocab = assets.checkpoint.config.vocabSize;
  const loss = async (plan: FusionPlan) => {
    const inst = await buildInstance(assets, plan, "wasm");
    try {
      return {
        heal: inst.heal,
        loss: (await evaluateQuality(windows, vocab, (ids) => inst.logitsOf(ids))).loss,
      };
    } finally {
      await inst.release();
    }
  };
  const before = (await loss(plain)).loss;
  const healed = await loss({ ...plain, heal: HEAL });
  return { report: healed.heal!, before, after: healed.loss };
}

Deno.test("normal equations: streamed in batches they give the one-shot ridge fit; residuals from the statistics alone; an exact linear map recovered with zero residual", () => {
  const { n, dIn, dOut, truth, h, y, random } = exactLinearData(5, 300, 12, 9);
  const eq = new NormalEquations(dIn, dOut);
  for (let r = 0; r < n; r += 70) {
    const m = Math.min(70, n - r);
    eq.add(m, h.subarray(r * dIn, (r + m) * dIn), y.subarray(r * dOut, (r + m) * dOut));
  }
  assert.equal(eq.rows, n);
  const w = eq.solve(1e-9);
  assert.ok(relL2(w, truth) < 1e-6, `recovered to ${relL2(w, truth)}`);
  assert.ok(relL2(w, ridgeFit({ n, dIn, dOut, h, y }, 1e-9)) < 1e-12, "same as the one-shot fit");
  assert.ok(eq.residual(w) < 1e-9 * eq.targetSquares, `zero residual (${eq.residual(w)})`);
  // Any other map: the statistics give the residual a direct sum gives.
  const other = Float64Array.from(w, (v) => v + random() - 0.5);
  const direct = residual({ n, dIn, dOut, h, y }, other);
  assert.ok(Math.abs(eq.residual(other) - direct) < 1e-9 * direct);
  // A stronger ridge shrinks the map towards zero.
  const norm = (v: Float64Array) => Math.hypot(...v);
  assert.ok(norm(eq.solve(10)) < norm(w));
  // Inputs zero throughout a batch (the units a block group's member lacks) are skipped, not lost.
  const sparse = Float64Array.from(h, (v, i) => (i < 140 * dIn && i % dIn === 3 ? 0 : v));
  const eq2 = new NormalEquations(dIn, dOut);
  eq2.add(140, sparse.subarray(0, 140 * dIn), y.subarray(0, 140 * dOut));
  eq2.add(n - 140, sparse.subarray(140 * dIn), y.subarray(140 * dOut));
  assert.ok(relL2(eq2.solve(1e-3), ridgeFit({ n, dIn, dOut, h: sparse, y }, 1e-3)) < 1e-12);
  // A new right-hand side for the same inputs, solved with the same factor: the fit of the new targets.
  const y2 = Float64Array.from(y, (v) => 2 * v + random() - 0.5);
  const factor = eq.factor(1e-3);
  const refit = factor.solve(eq.crossOf(n, h, y2));
  assert.ok(relL2(refit, ridgeFit({ n, dIn, dOut, h, y: y2 }, 1e-3)) < 1e-12);
  assert.ok(relL2(factor.solve(eq.cross), eq.solve(1e-3)) < 1e-15);
});

Deno.test("a stage is kept only when it beats the current model beyond the noise of the paired per-token losses", () => {
  const random = rng(9);
  const current = Float64Array.from({ length: 1000 }, () => 2 + random());
  // Lower by exactly 0.01 on average, with a spread of 0.3 or 0.003 per token.
  const noisy = Float64Array.from(current, (v, i) => v - 0.01 + (i % 2 ? 0.3 : -0.3));
  const steady = Float64Array.from(current, (v, i) => v - 0.01 + (i % 2 ? 0.003 : -0.003));
  assert.equal(clearlyBetter(noisy, current), false, "0.01 lower on average, within the noise");
  assert.equal(clearlyBetter(steady, current), true, "0.01 lower with little spread");
  assert.equal(clearlyBetter(current, current), false, "equal is not better");
  assert.equal(clearlyBetter(Float64Array.from(current, (v) => v + 0.01), current), false);
});

Deno.test("heal plan field: defaults, bounds, and a plan id that names the fit", () => {
  const p = parsePlan({ ffn_groups: [[3, 4, 5]], heal: {} });
  assert.deepEqual(p.heal, { calibration_tokens: 16384, skip_tokens: 0, heldout_tokens: 4096 });
  assert.equal(planId(p), "ffn[3-5]+heal(16384)");
  assert.equal(
    planId(
      parsePlan({
        ffn_groups: [[3, 4]],
        heal: { skip_tokens: 65536, calibration_tokens: 1024, heldout_tokens: 512 },
      }),
    ),
    "ffn[3-4]+heal(1024@65536/512)",
  );
  assert.equal(planId(parsePlan({ ffn_groups: [], heal: {} })), "unfused", "nothing fused, nothing healed");
  assert.throws(
    () => parsePlan({ ffn_groups: [[3, 4]], heal: { calibration_tokens: 10 } }),
    /heal\.calibration_tokens/,
  );
  assert.throws(() => parsePlan({ ffn_groups: [[3, 4]], heal: { tokens: 100 } }), /heal/);
});

Deno.test({
  name:
    "healing tiny-nas ffn[3-8]: members' input residual falls on calibration and held-out tokens; evaluation loss below the unhealed plan's; too few tokens for the down projection is said",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const { report, before, after } = await healedAgainstPlain(TINY_NAS, {
      version: 1,
      ffn_groups: [[3, 4, 5, 6, 7, 8]],
    });
    assert.equal(report.calibration_tokens, 1024);
    assert.equal(report.heldout_tokens, 1024);
    const [g] = report.groups;
    assert.deepEqual(g.layers, [3, 4, 5, 6, 7, 8]);
    assert.equal(g.healed, true, JSON.stringify(g));
    const [inputs, down] = g.stages;
    assert.equal(inputs.objective, "member_input");
    assert.equal(inputs.kept, true);
    assert.ok(
      inputs.residual.calibration.after < 0.8 * inputs.residual.calibration.before,
      JSON.stringify(inputs),
    );
    assert.ok(inputs.residual.heldout.after < inputs.residual.heldout.before, JSON.stringify(inputs));
    assert.equal(inputs.tried.length, INPUT_RIDGES.length);
    assert.equal(down.objective, "down_projection");
    assert.equal(down.kept, false);
    assert.match(down.note!, /1024 calibration tokens are too few to refit a 4608-wide projection/);
    assert.ok(g.heldout_loss.healed < g.heldout_loss.unhealed);
    assert.ok(after < before, `evaluation loss healed ${after} < unhealed ${before}`);
  },
});

Deno.test({
  name:
    "healing never makes it worse: tiny-llama -attn[5]+ffn[4-5]: a stage no ridge improves is not kept, and the report says so",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const { report, before, after } = await healedAgainstPlain(TINY_LLAMA, {
      version: 2,
      attention: { remove: [5], linear: [] },
      ffn_groups: [[4, 5]],
      block_groups: [],
    });
    const [g] = report.groups;
    assert.ok(g.heldout_loss.healed <= g.heldout_loss.unhealed);
    assert.equal(
      g.stages[1].tried.length,
      DOWN_RIDGES.length,
      "the down projection of the 1536-wide group was refitted and scored",
    );
    for (const stage of g.stages) {
      if (stage.kept) continue;
      assert.match(stage.note!, /no ridge lowered the held-out loss/);
      assert.equal(stage.ridge, null);
    }
    assert.ok(after <= before + 1e-3, `evaluation loss healed ${after} <= unhealed ${before}`);
  },
});

Deno.test({
  name:
    "healing a block group: tiny-nas blk[8-9]'s FFN down projections are refitted and scored, kept only if clearly better; healed blocks carry their weights",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const assets = await loadAssets(TINY_NAS, {}, EVAL_TEXT);
    const plan: FusionPlan = {
      version: 2,
      attention: { remove: [], linear: [] },
      ffn_groups: [],
      block_groups: [[8, 9]],
      heal: HEAL,
    };
    assert.equal(planId(plan), "blk[8-9]+heal(1024@65536/1024)");
    const healed = await buildInstance(assets, plan, "wasm");
    const [g] = healed.heal!.groups;
    assert.equal(g.kind, "block");
    assert.deepEqual(g.layers, [8, 9]);
    const [down] = g.stages;
    assert.equal(down.objective, "down_projection");
    assert.equal(down.tried.length, DOWN_RIDGES.length, JSON.stringify(down));
    assert.ok(g.heldout_loss.healed <= g.heldout_loss.unhealed);
    await healed.release();
    // Where a fit is kept, the group's members serve it: each FFN's refitted down projection, under
    // the fit's own weight names.
    const d = assets.checkpoint.config.hidden;
    const down9 = new Float32Array(d * 768).fill(0.5);
    const blocks = applyPlan(assets.blocks, plan, "fused", new Map(), {
      maps: new Map(),
      blockDowns: new Map([[9, down9]]),
      variant: "heal(x)",
    });
    const group = blocks.find((b) => b.kind === "parallel_blocks") as Extract<
      Block,
      { kind: "parallel_blocks" }
    >;
    const ffn9 = group.members[1].find((b) => b.kind === "ffn") as FfnBlock;
    assert.equal(ffn9.down.data, down9);
    assert.equal(ffn9.variant, "heal(x)");
    const ffn8 = group.members[0].find((b) => b.kind === "ffn") as FfnBlock;
    assert.equal(ffn8.variant, undefined, "a member without a fit keeps its weights");
  },
});

Deno.test({
  name:
    "POST /fuse heals a plan that asks for it, GET /fuse shows the stage meanwhile, the answer reports it; bad heal settings are 400 naming the field",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const server = await startServer(["--device", "wasm"]);
    await server.ready;
    try {
      const bad = await post(server.base, "/fuse", { ffn_groups: [[3, 4]], heal: { heldout_tokens: 1 } });
      assert.equal(bad.status, 400);
      assert.match((await bad.json()).error.message, /heal\.heldout_tokens/);
      const tooFar = await post(server.base, "/fuse", {
        ffn_groups: [[3, 4]],
        heal: { skip_tokens: 10_000_000, calibration_tokens: 64 },
      });
      assert.equal(tooFar.status, 400, await tooFar.clone().text());
      const pending = post(server.base, "/fuse", {
        ffn_groups: [[3, 4, 5]],
        heal: { skip_tokens: 65536, calibration_tokens: 256, heldout_tokens: 256 },
      });
      // While it builds, GET /fuse says which healing stage the build is in.
      const stages = new Set<string>();
      let settled = false;
      pending.finally(() => (settled = true));
      while (!settled) {
        const progress = (await (await fetch(`${server.base}/fuse`)).json()).build_progress;
        if (progress) stages.add(progress.stage);
        await new Promise((r) => setTimeout(r, 20));
      }
      assert.ok([...stages].some((s) => /^heal ffn\[3-5\]: /.test(s)), `stages seen: ${[...stages]}`);
      const res = await pending;
      assert.equal(res.status, 200, await res.clone().text());
      const body = await res.json();
      assert.equal(body.active.id, "ffn[3-5]+heal(256@65536/256)");
      assert.deepEqual(body.active.heal.groups[0].layers, [3, 4, 5]);
      const gen = await post(server.base, "/v1/completions", {
        prompt: "def main(",
        max_tokens: 8,
        temperature: 0,
      });
      assert.equal(gen.status, 200);
      assert.equal((await gen.json()).usage.completion_tokens, 8);
    } finally {
      await server.stop();
    }
  },
});

Deno.test("cli: bad heal settings and a calibration text too short for them exit 2 naming the problem", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const cases: [unknown, RegExp][] = [
      [{ ffn_groups: [[3, 4]], heal: { calibration_tokens: 10 } }, /heal\.calibration_tokens/],
      [{ ffn_groups: [[3, 4]], heal: { window: 64 } }, /heal/],
      [
        { ffn_groups: [[3, 4]], heal: { skip_tokens: 139000 } },
        /heal: the calibration text has \d+ of the 16384 calibration tokens/,
      ],
    ];
    for (const [i, [plan, re]] of cases.entries()) {
      const file = join(dir, `plan${i}.json`);
      await Deno.writeTextFile(file, JSON.stringify(plan));
      const out = await new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "-A",
          join(ROOT, "main.ts"),
          "eval",
          "--text",
          EVAL_TEXT,
          "--plan",
          file,
          "--device",
          "wasm",
        ],
        stdout: "piped",
        stderr: "piped",
      }).output();
      const stderr = new TextDecoder().decode(out.stderr);
      assert.equal(out.code, 2, stderr);
      assert.match(stderr, re);
      assert.doesNotMatch(stderr, /^\s+at /m, "no stack trace");
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test({
  name:
    "bench/studies/heal_logits.ts: Gauss-Newton steps on the logits' KL measured on held-out loss, never kept when worse; bad flags exit 2",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const run = (...args: string[]) => runScript("bench/studies/heal_logits.ts", ...args);
    const small = [
      "--group",
      "7-8",
      "--calibration-tokens",
      "1024",
      "--heldout-tokens",
      "256",
      "--eval-tokens",
    ];
    const r = await run(...small, "512", "--steps", "1", "--ridges", "1", "--etas", "0.01,0.1", "--json");
    assert.equal(r.code, 0, r.stderr);
    const report = JSON.parse(r.stdout);
    assert.equal(report.start.gap_closed, 0, "the fused model's own evaluation loss");
    assert.ok(report.eval.fused > report.eval.unfused);
    assert.equal(report.steps.length, 1);
    const [step] = report.steps;
    assert.ok(step.calibration_kl > 0 && step.calibration_kl < 1, `calibration KL ${step.calibration_kl}`);
    assert.ok(
      step.tried.length >= 1 && step.tried.every((x: { heldout: number }) => Number.isFinite(x.heldout)),
    );
    assert.ok(step.heldout <= report.start.heldout, "a step is kept only when it lowers the held-out loss");
    if (!step.kept) assert.equal(step.eval, report.start.eval);
    for (
      const [args, re] of [
        [["--group", "8-7"], /--group: expected FIRST-LAST/],
        [["--group", "8-9"], /--group: .*layer 9 has attention/],
        [["--from", "nowhere"], /--from: fused or healed/],
        [["--steps", "0"], /--steps: expected a positive integer/],
        [["--skip-tokens", "abc"], /--skip-tokens: expected a whole number/],
        [["--bogus"], /Unknown option '--bogus'/],
        [["--etas", "0.1,x"], /--etas: expected a positive number/],
      ] as [string[], RegExp][]
    ) {
      const bad = await run(...args);
      assert.equal(bad.code, 2, `${args.join(" ")}: ${bad.stderr}`);
      assert.match(bad.stderr, re);
    }
  },
});
