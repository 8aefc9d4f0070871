import assert from "node:assert/strict";
import { applyPlan } from "../src/fusion/apply.ts";
import { planId, validatePlan } from "../src/fusion/plan.ts";
import { type Block, layerOf, unfusedBlocks } from "../src/model/blocks.ts";
import { type Checkpoint, loadCheckpoint } from "../src/model/checkpoint.ts";
import { referenceForward } from "../src/model/forward.ts";
import { buildDecoderGraph } from "../src/onnx/decoder.ts";
import { resolveDevice } from "../src/ort/ort.ts";
import { disposeCache, ModelSession } from "../src/ort/session.ts";
import { EVAL_TEXT, exactLinearData, golden, relL2, ROOT, TINY_LLAMA, TINY_NAS } from "./helpers.ts";
import { join } from "node:path";
import {
  attentionData,
  FIT_SLICE,
  fitLinearAttention,
  residual,
  ridgeFit,
} from "../src/fusion/linear_fit.ts";
import { textWindows } from "../src/fusion/calibration.ts";
import { buildInstance, loadAssets } from "../src/instance/build.ts";

Deno.test("plan v2: attention removal, FFN groups over removed attention, block groups; rules named", async () => {
  const llama = (await loadCheckpoint(TINY_LLAMA)).config;
  const nas = (await loadCheckpoint(TINY_NAS)).config;
  const plan = validatePlan({
    version: 2,
    attention: { remove: [4, 5] },
    ffn_groups: [[3, 4, 5]],
    block_groups: [[6, 7]],
  }, llama);
  assert.equal(planId(plan), "-attn[4,5]+ffn[3-5]+blk[6-7]");
  assert.equal(planId(validatePlan({ version: 2 }, llama)), "unfused");
  assert.equal(
    planId(validatePlan({ ffn_groups: [[3, 4, 5]] }, nas)),
    "ffn[3-5]",
    "version 1 files stay valid",
  );
  const bad: [unknown, typeof llama, RegExp][] = [
    [
      { version: 2, ffn_groups: [[3, 4]] },
      llama,
      /layer 4 has attention; .*\(remove it with attention\.remove or attention\.linear\)/,
    ],
    [
      { version: 2, attention: { remove: [4] } },
      nas,
      /attention\.remove\[0\] \(4\): layer 4 has no attention to remove/,
    ],
    [{ version: 2, attention: { remove: [2, 2] } }, llama, /layer 2 is listed twice/],
    [{ version: 2, attention: { remove: [8] } }, llama, /layer 8 is out of range \(the model has 8 layers/],
    [
      { version: 2, attention: { remove: [4] }, ffn_groups: [[3, 4]], block_groups: [[4, 5]] },
      llama,
      /block_groups\[0\] \[4,5\]: layer 4 is already in ffn_groups\[0\] \[3,4\]; no layer may be in two groups/,
    ],
    [{ version: 2, block_groups: [[5, 7]] }, llama, /consecutive and ascending \(5 is followed by 7\)/],
    [
      { version: 2, attention: { remove: [1], linear: [1] } },
      llama,
      /attention\.linear\[0\] \(1\): layer 1 is listed twice/,
    ],
    [{ version: 2, attention: { lineer: [1] } }, llama, /attention\.lineer: unknown/],
    [{ version: 2, block_group: [[1, 2]] }, llama, /block_group/],
  ];
  for (const [raw, cfg, re] of bad) assert.throws(() => validatePlan(raw, cfg), re, JSON.stringify(raw));
});

/** Last logits of the graph for `ids`: a prefill of all but the last token, then a cached decode step. */
async function graphLogits(ckpt: Checkpoint, blocks: Block[], ids: number[]) {
  const session = await ModelSession.create(
    buildDecoderGraph(ckpt, blocks),
    await resolveDevice("wasm"),
    ckpt.config.vocabSize,
  );
  try {
    const v = ckpt.config.vocabSize;
    const whole = await session.step(ids, session.emptyCache());
    disposeCache(whole.cache);
    const prefix = await session.step(ids.slice(0, -1), session.emptyCache());
    const next = await session.step(ids.slice(-1), prefix.cache);
    disposeCache(next.cache);
    return { prefill: whole.logits.subarray(whole.logits.length - v), decode: next.logits };
  } finally {
    await session.release();
  }
}

const hidden = (ckpt: Checkpoint, blocks: Block[], ids: number[], x?: Float64Array) =>
  referenceForward(ckpt, blocks, ids, { logits: "none", ...(x ? { start: { block: 0, x } } : {}) }).hidden;

Deno.test({
  name:
    "plan v2 on tiny-llama: removed attention and block groups match independent float64 references (1e-5)",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const ckpt = await loadCheckpoint(TINY_LLAMA);
    const ids = (await golden(TINY_LLAMA)).cases[0].input_ids as number[];
    const unfused = unfusedBlocks(ckpt);
    const layers = (keep: (layer: number) => boolean) => unfused.filter((b) => keep(layerOf(b)!));
    const check = async (plan: unknown, expected: Float64Array) => {
      const valid = validatePlan(plan, ckpt.config);
      const blocks = applyPlan(unfused, valid);
      const got = await graphLogits(ckpt, blocks, ids);
      for (const [name, logits] of Object.entries(got)) {
        const err = relL2(logits, expected);
        assert.ok(err < 1e-5, `${planId(valid)} ${name}: ${err}`);
      }
    };
    const logitsOf = (x: Float64Array) =>
      referenceForward(ckpt, [], ids, { start: { block: 0, x }, logits: "last" }).logits;

    // Removing attention 4 and 5 is the model with those two blocks skipped.
    const skipped = unfused.filter((b) => !(b.kind === "attention" && (b.layer === 4 || b.layer === 5)));
    await check(
      { version: 2, attention: { remove: [4, 5] } },
      referenceForward(ckpt, skipped, ids, { logits: "last" }).logits,
    );

    // Block group [5, 6]: x + (layer5(x) - x) + (layer6(x) - x), each layer with its own attention cache.
    const x = hidden(ckpt, layers((l) => l < 5), ids);
    const y5 = hidden(ckpt, layers((l) => l === 5), ids, x);
    const y6 = hidden(ckpt, layers((l) => l === 6), ids, x);
    const merged = x.map((v, i) => v + (y5[i] - v) + (y6[i] - v));
    await check(
      { version: 2, block_groups: [[5, 6]] },
      logitsOf(hidden(ckpt, layers((l) => l > 6), ids, merged)),
    );

    // Removing attention 4..6 makes FFNs 3..6 an attention-free run, which then fuses.
    const removed = unfused.filter((b) => !(b.kind === "attention" && b.layer >= 4 && b.layer <= 6));
    const parallel = applyPlan(removed, { version: 1, ffn_groups: [[3, 4, 5, 6]] }, "parallel");
    await check(
      { version: 2, attention: { remove: [4, 5, 6] }, ffn_groups: [[3, 4, 5, 6]] },
      referenceForward(ckpt, parallel, ids, { logits: "last" }).logits,
    );
  },
});

Deno.test("linear fit: recovers an exactly linear map to 1e-6; on calibration data beats no-op and identity", async () => {
  const { n, dIn, dOut, truth, h, y } = exactLinearData(11, 400, 24, 16);
  const w = ridgeFit({ n, dIn, dOut, h, y });
  assert.ok(relL2(w, truth) < 1e-6, `recovered to ${relL2(w, truth)}`);

  const ckpt = await loadCheckpoint(TINY_LLAMA);
  const assets = await loadAssets(TINY_LLAMA);
  const windows = await textWindows(EVAL_TEXT, assets.tokenizer, FIT_SLICE);
  const data = attentionData(ckpt, [2, 5], windows);
  const d = ckpt.config.hidden;
  const identity = new Float64Array(d * d).map((_, i) => (i % (d + 1) === 0 ? 1 : 0));
  for (const [layer, fit] of data) {
    assert.equal(fit.n, 512, "one row per calibration token");
    const fitted = residual(fit, ridgeFit(fit));
    assert.ok(fitted < residual(fit, new Float64Array(d * d)), `layer ${layer}: below the no-op map`);
    assert.ok(fitted < residual(fit, identity), `layer ${layer}: below the identity map`);
  }
});

Deno.test({
  name:
    "plan v2 linear attention: the graph equals the float64 reference with the fitted map (1e-5), and fuses",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const ckpt = await loadCheckpoint(TINY_LLAMA);
    const assets = await loadAssets(TINY_LLAMA, {}, EVAL_TEXT);
    const ids = (await golden(TINY_LLAMA)).cases[0].input_ids as number[];
    const windows = await textWindows(EVAL_TEXT, assets.tokenizer, FIT_SLICE);
    const fits = fitLinearAttention(ckpt, [4, 5], windows);
    // The reference: attention 4 and 5 replaced by y = W . input_layernorm(x), built by hand.
    const replaced = unfusedBlocks(ckpt).map((b): Block =>
      b.kind === "attention" && fits.has(b.layer)
        ? { kind: "linear", layer: b.layer, part: "attention", weights: fits.get(b.layer)! }
        : b
    );
    const plan = validatePlan({ version: 2, attention: { linear: [4, 5] } }, ckpt.config);
    assert.equal(planId(plan), "lin[4,5]");
    const inst = await buildInstance(assets, plan, await resolveDevice("wasm"));
    try {
      const logits = await inst.logitsOf(ids);
      const want = referenceForward(ckpt, replaced, ids, { logits: "last" }).logits;
      const err = relL2(logits.subarray(logits.length - ckpt.config.vocabSize), want);
      assert.ok(err < 1e-5, `linear attention: ${err}`);
    } finally {
      await inst.release();
    }
    // With attention 4 and 5 linear, FFNs 3..5 fuse; the linear maps run beside them from the same input.
    const fused = validatePlan(
      { version: 2, attention: { linear: [4, 5] }, ffn_groups: [[3, 4, 5]] },
      ckpt.config,
    );
    const blocks = applyPlan(unfusedBlocks(ckpt), fused, "fused", fits);
    const parallel = applyPlan(unfusedBlocks(ckpt), fused, "parallel", fits);
    const got = await graphLogits(ckpt, blocks, ids);
    const want = referenceForward(ckpt, parallel, ids, { logits: "last" }).logits;
    for (const [name, l] of Object.entries(got)) {
      assert.ok(relL2(l, want) < 1e-5, `${name}: ${relL2(l, want)}`);
    }
    await assert.rejects(
      buildInstance(await loadAssets(TINY_LLAMA), plan, "wasm"),
      /attention\.linear needs calibration text/,
    );
  },
});

Deno.test("bad input for version 2 plans and the frontier: exit 2 naming the flag", async () => {
  const dir = await Deno.makeTempDir();
  const planFile = `${dir}/plan.json`;
  await Deno.writeTextFile(planFile, JSON.stringify({ version: 2, attention: { linear: [3] } }));
  const run = async (...args: string[]) => {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", join(ROOT, "main.ts"), ...args],
      stdout: "null",
      stderr: "piped",
    }).output();
    return { code: out.code, stderr: new TextDecoder().decode(out.stderr) };
  };
  const cases: [string[], RegExp][] = [
    [
      [
        "generate",
        "--model",
        TINY_LLAMA,
        "--device",
        "wasm",
        "--plan",
        planFile,
        "--calibration",
        `${dir}/nope.txt`,
        "--prompt",
        "x",
      ],
      /cannot read text .*nope\.txt/,
    ],
    [["analyze", "--model", TINY_LLAMA, "--text", EVAL_TEXT, "--remove-steps", "-1"], /--remove-steps/],
    [
      ["analyze", "--model", TINY_LLAMA, "--text", EVAL_TEXT, "--max-loss-increase", "-5"],
      /--max-loss-increase/,
    ],
  ];
  try {
    for (const [args, re] of cases) {
      const r = await run(...args);
      assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
      assert.match(r.stderr, re);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
