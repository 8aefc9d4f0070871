import assert from "node:assert/strict";
import { TextTokenizer } from "../src/model/tokenizer.ts";
import { StopMatcher } from "../src/decode/generate.ts";
import { argmax, expNonPositive, rng } from "../src/numeric.ts";
import { DEFAULT_SAMPLING, Sampler } from "../src/sampling/sampling.ts";
import { TINY_NAS } from "./helpers.ts";

Deno.test("tokenizer: streaming decode emits whole characters and reassembles the text exactly", async () => {
  const tok = await TextTokenizer.load(TINY_NAS);
  const text = "def naïve(x):\n    return '→ 日本' + x  # ünïcode ✓\n";
  const ids = tok.encode(text);
  assert.equal(tok.decode(ids), text);
  const dec = tok.streamDecoder();
  const parts = ids.map((id) => dec.push(id));
  parts.push(dec.flush());
  assert.equal(parts.join(""), text);
  assert.ok(parts.every((p) => !p.includes("\uFFFD")), "no replacement characters mid-stream");
});

Deno.test("sampling: greedy is argmax; repetition penalty divides positive and multiplies negative logits", () => {
  const row = Float32Array.from([1, 3, 2, -1]);
  assert.equal(new Sampler(DEFAULT_SAMPLING).next(row, []), 1);
  const pen = new Sampler({ ...DEFAULT_SAMPLING, repetitionPenalty: 2 });
  assert.equal(pen.next(row, [1]), 2); // 3/2 = 1.5 < 2
  assert.equal(pen.next(Float32Array.from([-1, -0.6, -2]), [0]), 1); // -1*2 = -2 < -0.6
  assert.equal(argmax([0, 5, 5]), 1);
});

Deno.test("sampling: top-k and top-p really restrict the support, and the distribution is softmax(l/T)", () => {
  const row = Float32Array.from([2, 1, 0, -1, -3]);
  const s = new Sampler({ ...DEFAULT_SAMPLING, temperature: 0.5, topK: 3 });
  const d = s.distribution(row);
  assert.deepEqual(d.ids, [0, 1, 2]);
  const z = [2, 1, 0].map((l) => Math.exp(l / 0.5));
  const sum = z.reduce((a, b) => a + b);
  d.probs.forEach((p, i) => assert.ok(Math.abs(p - z[i] / sum) < 1e-12));
  const p = new Sampler({ ...DEFAULT_SAMPLING, temperature: 1, topP: 0.7 }).distribution(row);
  assert.deepEqual(p.ids, [0, 1]); // 0.64 < 0.7 <= 0.64 + 0.24
  for (let seed = 0; seed < 200; seed++) {
    const id = new Sampler({ ...DEFAULT_SAMPLING, temperature: 1, topP: 0.7, seed }).next(row, []);
    assert.ok(id === 0 || id === 1, `top-p sampled ${id}`);
  }
});

Deno.test("sampling: top-k and top-p found without sorting the vocabulary give the sorted definition's distribution", () => {
  // The definition: sort every id by logit (stable), keep k, softmax over them, keep the prefix reaching p.
  const reference = (row: Float32Array, t: number, k: number, p: number) => {
    let ids = Array.from(row, (_, i) => i).sort((a, b) => row[b] - row[a]);
    if (k > 0 && k < ids.length) ids = ids.slice(0, k);
    const e = ids.map((id) => Math.exp((row[id] - row[ids[0]]) / t));
    const sum = e.reduce((a, b) => a + b);
    let probs = e.map((x) => x / sum);
    if (p < 1) {
      let cum = 0;
      let keep = 0;
      while (keep < probs.length && cum < p) cum += probs[keep++];
      ids = ids.slice(0, Math.max(1, keep));
      const kept = probs.slice(0, ids.length).reduce((a, b) => a + b);
      probs = probs.slice(0, ids.length).map((x) => x / kept);
    }
    return { ids, probs };
  };
  const random = rng(9);
  for (const spread of [0.5, 4, 30]) {
    // Rounded logits make ties; a few masked ones (a grammar's -Infinity).
    const row = Float32Array.from({ length: 20000 }, () => Math.round((random() - 0.5) * spread * 8) / 8);
    for (let i = 0; i < 50; i++) row[Math.floor(random() * row.length)] = -Infinity;
    for (
      const [t, k, p] of [[0.7, 0, 0.9], [1, 40, 1], [1.3, 500, 0.95], [0.5, 0, 0.5], [1, 0, 0.999], [
        1,
        3,
        0.1,
      ]]
    ) {
      const got = new Sampler({ ...DEFAULT_SAMPLING, temperature: t, topK: k, topP: p }).distribution(row);
      const want = reference(row, t, k, p);
      const what = `spread ${spread}, T ${t}, k ${k}, p ${p}`;
      assert.deepEqual(got.ids, want.ids, what);
      got.probs.forEach((x, i) => assert.ok(Math.abs(x - want.probs[i]) < 1e-12, what));
    }
  }
});

Deno.test("sampling: a seed makes sampling reproducible; frequencies follow the distribution", () => {
  const row = Float32Array.from([0, Math.log(3)]);
  const draw = (seed: number) => {
    const s = new Sampler({ ...DEFAULT_SAMPLING, temperature: 1, seed });
    return Array.from({ length: 4000 }, () => s.next(row, []));
  };
  assert.deepEqual(draw(42), draw(42));
  const ones = draw(7).filter((x) => x === 1).length / 4000;
  assert.ok(Math.abs(ones - 0.75) < 0.03, `P(1) = ${ones}`);
});

Deno.test("sampling: a plain sampler draws from exponentials computed elsewhere what it draws from the row", () => {
  const rng0 = rng(3);
  const row = Float32Array.from({ length: 5000 }, () => (rng0() - 0.5) * 12);
  const params = { ...DEFAULT_SAMPLING, temperature: 0.7, seed: 11 };
  const exps = Array.from(row, (l) => Math.exp((l - Math.max(...row)) / 0.7));
  const sum = exps.reduce((a, b) => a + b);
  const probs = Float32Array.from(exps, (x) => x / sum);
  const fromRow = new Sampler(params);
  const fromProbs = new Sampler(params);
  const a = Array.from({ length: 300 }, () => fromRow.next(row, []));
  const b = Array.from({ length: 300 }, () => fromProbs.draw(probs));
  assert.deepEqual(b, a, "the same random numbers, the same tokens");
  assert.ok(new Set(a).size > 50, "the draws really vary");
  assert.ok(new Sampler(params).plain);
  for (
    const other of [{ temperature: 0 }, { topK: 5 }, { topP: 0.9 }, { repetitionPenalty: 1.1 }, {
      presencePenalty: 0.5,
    }]
  ) {
    assert.ok(!new Sampler({ ...params, ...other }).plain, JSON.stringify(other));
  }
  // Rounding that leaves the draw past the sum takes the likeliest.
  assert.equal(new Sampler({ ...params, seed: 1 }).draw(Float32Array.from([0, 0, 0])), 0);
});

Deno.test("stop sequences: text is held back while it may still become a stop, and cut before it", () => {
  const m = new StopMatcher(["\n\n", "END"]);
  assert.deepEqual(m.push("abc\n"), { emit: "abc", stopped: false });
  assert.deepEqual(m.push("x E"), { emit: "\nx ", stopped: false });
  assert.deepEqual(m.push("NDtail"), { emit: "", stopped: true });
  const n = new StopMatcher(["\n\n"]);
  assert.deepEqual(n.push("a\n"), { emit: "a", stopped: false });
  assert.deepEqual(n.push("\nb"), { emit: "", stopped: true });
  const none = new StopMatcher([]);
  assert.deepEqual(none.push("free"), { emit: "free", stopped: false });
});

Deno.test("sampling: presence and frequency penalties count the tokens this sampler generated, as OpenAI does", () => {
  const row = Float32Array.from([1, 1.5, 0]);
  const presence = new Sampler({ ...DEFAULT_SAMPLING, presencePenalty: 1 });
  // The prompt (history) does not count: 1 first; then 1.5 - 1 < 1, so 0; then both penalised: 1 again.
  const picks = [presence.next(row, [1, 1, 1]), presence.next(row, []), presence.next(row, [])];
  assert.deepEqual(picks, [1, 0, 1]);
  // Frequency: 1.5 - 0.4 n stays above 1 for one repeat, then 0 wins: 1, 1, 0.
  const frequency = new Sampler({ ...DEFAULT_SAMPLING, frequencyPenalty: 0.4 });
  assert.deepEqual([frequency.next(row, []), frequency.next(row, []), frequency.next(row, [])], [1, 1, 0]);
  // A negative presence penalty makes a chosen token stickier.
  const sticky = new Sampler({ ...DEFAULT_SAMPLING, presencePenalty: -2 });
  assert.deepEqual(
    [sticky.next(Float32Array.from([1, 0.9]), []), sticky.next(Float32Array.from([0, 1]), [])],
    [0, 0],
  );
});

Deno.test("expNonPositive: e^x for x <= 0 within 2e-7 relative, 0 past the last subnormal", () => {
  const r = rng(11);
  for (let i = 0; i < 100000; i++) {
    const x = -(r() ** 2) * 700;
    const rel = Math.abs(expNonPositive(x) / Math.exp(x) - 1);
    assert.ok(rel < 2e-7, `e^${x}: ${expNonPositive(x)} against ${Math.exp(x)}`);
  }
  assert.equal(expNonPositive(0), 1);
  assert.equal(expNonPositive(-800), 0);
  assert.ok(expNonPositive(-740) > 0);
});
