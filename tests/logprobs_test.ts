import assert from "node:assert/strict";
import { TextTokenizer } from "../src/model/tokenizer.ts";
import { TokenSink } from "../src/decode/generate.ts";
import { describe, logSoftmaxTop } from "../src/sampling/logprobs.ts";
import { Sampler } from "../src/sampling/sampling.ts";
import { TINY_NAS } from "./helpers.ts";

function randomRow(n: number, seed: number): Float32Array {
  let s = seed;
  return Float32Array.from({ length: n }, () => {
    s = (s * 1103515245 + 12345) % 2 ** 31;
    return (s / 2 ** 31) * 20 - 10;
  });
}

Deno.test("logprobs: log-softmax and the n likeliest match a float64 sort of the whole row", () => {
  for (const [len, n, t] of [[4096, 5, 1], [1000, 20, 0.7], [7, 7, 2], [50, 0, 1]] as const) {
    const row = randomRow(len, len + n);
    const ref = Array.from(row, (x) => x / t);
    const max = Math.max(...ref);
    const lse = max + Math.log(ref.reduce((s, x) => s + Math.exp(x - max), 0));
    const id = 3;
    const got = logSoftmaxTop(row, id, n, t);
    assert.ok(Math.abs(got.logprob - (ref[id] - lse)) < 1e-9);
    const order = ref.map((x, i) => [i, x - lse] as const).sort((a, b) => b[1] - a[1]).slice(0, n);
    assert.deepEqual(got.top.map(([i]) => i), order.map(([i]) => i));
    got.top.forEach(([, lp], k) => assert.ok(Math.abs(lp - order[k][1]) < 1e-9));
  }
});

Deno.test("logprobs: Sampler.score reports the distribution it sampled from (penalties, temperature, top-k, top-p)", () => {
  const row = randomRow(300, 11);
  const s = new Sampler({ temperature: 0.8, topK: 10, topP: 0.9, repetitionPenalty: 1, seed: 5 });
  const id = s.next(row, []);
  const { ids, probs } = s.distribution(row);
  const scored = s.score(id, 50);
  assert.ok(Math.abs(scored.logprob - Math.log(probs[ids.indexOf(id)])) < 1e-12);
  assert.equal(scored.top.length, ids.length, "only the support the filters kept");
  assert.ok(Math.abs(scored.top.reduce((a, [, lp]) => a + Math.exp(lp), 0) - 1) < 1e-9);
  // Greedy reports the model's own distribution; a frequency penalty shows in it.
  const g = new Sampler({ temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, frequencyPenalty: 2 });
  const first = g.next(row, []);
  assert.ok(Math.abs(g.score(first, 1).logprob - logSoftmaxTop(row, first, 0).logprob) < 1e-12);
  g.next(row, []);
  const penalised = Float32Array.from(row);
  penalised[first] -= 2;
  const second = g.score(first, 0).logprob;
  assert.ok(Math.abs(second - logSoftmaxTop(penalised, first, 0).logprob) < 1e-12);
});

Deno.test("logprobs: tokens carry their text and exact bytes, split characters included", async () => {
  const tok = await TextTokenizer.load(TINY_NAS);
  const ids = tok.encode("naïve 日本");
  const bytes = ids.flatMap((id) => tok.piece(id).bytes);
  assert.equal(new TextDecoder().decode(new Uint8Array(bytes)), "naïve 日本");
  const d = describe(tok, ids[0], { logprob: -1, top: [[ids[1], -2]] });
  const [p0, p1] = [tok.piece(ids[0]), tok.piece(ids[1])];
  assert.deepEqual(d, {
    token: p0.text,
    bytes: p0.bytes,
    logprob: -1,
    top: [{ token: p1.text, bytes: p1.bytes, logprob: -2 }],
  });
});

Deno.test("generation: a chat's end-of-turn id ends the run like EOS; logprobs follow the text they made", async () => {
  const tok = await TextTokenizer.load(TINY_NAS);
  const params = { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, maxTokens: 10, stop: [] };
  const [a, b] = tok.encode(" hello world");
  const lp = (id: number) => ({
    token: tok.piece(id).text,
    bytes: tok.piece(id).bytes,
    logprob: -1,
    top: [],
  });
  const sink = new TokenSink(tok, { ...params, stopTokenIds: [42] }, [0]);
  assert.deepEqual(sink.push(a, lp(a)), { text: tok.decode([a]), logprobs: [lp(a)] });
  assert.deepEqual(sink.push(42, lp(42)), { text: "" });
  assert.ok(sink.done);
  assert.equal(sink.finishReason, "stop");
  assert.deepEqual(sink.ids, [a, 42]);
  // Text held back for a possible stop sequence keeps its logprobs until it is let out.
  const held = new TokenSink(tok, { ...params, stop: [tok.decode([a, b]) + "!"] }, [0]);
  assert.deepEqual(held.push(a, lp(a)), { text: "" });
  assert.deepEqual(held.push(b, lp(b)), { text: "" });
  held.finish("length");
  assert.deepEqual(held.tail(), { text: tok.decode([a, b]), logprobs: [lp(a), lp(b)] });
});
