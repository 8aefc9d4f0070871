import assert from "node:assert/strict";
import { rng } from "../src/numeric.ts";
import { GpuSampler, ringId, ringScored, type SampleRow } from "../src/ort/gpu_sampler.ts";
import { DEFAULT_SAMPLING, Sampler, type SamplingParams } from "../src/sampling/sampling.ts";
import { requestGpu } from "../src/webgpu/device.ts";
import { HAS_WEBGPU } from "./helpers.ts";

const VOCAB = 1000;

/** A row of logits with a few clear favourites over a crowd of close ones, as a language model's look. */
function randomLogits(seed: number): Float32Array<ArrayBuffer> {
  const r = rng(seed);
  return Float32Array.from({ length: VOCAB }, () => 4 * (r() - 0.5) + (r() < 0.01 ? 6 * r() : 0));
}

async function gpuSampler(slots: number, logits: Float32Array<ArrayBuffer>) {
  const { device } = await requestGpu();
  const usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC;
  const ids = device.createBuffer({ size: slots * 4, usage });
  const sampler = await GpuSampler.create(device, VOCAB, slots, ids);
  const buffer = device.createBuffer({ size: logits.byteLength, usage });
  device.queue.writeBuffer(buffer, 0, logits);
  return { device, sampler, buffer };
}

const params = (p: Partial<SamplingParams>): SamplingParams => ({ ...DEFAULT_SAMPLING, ...p });

Deno.test({
  name:
    "GPU sampler: greedy with every penalty picks the host's ids step after step, log-probabilities to 1e-4",
  ignore: !HAS_WEBGPU,
  fn: async () => {
    const row = randomLogits(3);
    const order = Array.from(row.keys()).sort((a, b) => row[b] - row[a]);
    // The prompt holds the favourite, so the repetition penalty changes the argmax.
    const prompt = [order[0], 5, 9];
    const variants = [
      params({}),
      params({ repetitionPenalty: 1.5 }),
      params({ presencePenalty: 0.7, frequencyPenalty: 0.9 }),
      params({ repetitionPenalty: 1.2, frequencyPenalty: 2 }),
    ];
    const { device, sampler, buffer } = await gpuSampler(variants.length, row);
    const hosts = variants.map((p) => new Sampler(p));
    const histories = variants.map(() => [...prompt]);
    variants.forEach((p, slot) => sampler.startSequence(slot, prompt, p));
    for (let step = 0; step < 6; step++) {
      const rows: SampleRow[] = variants.map((p, slot) => ({
        logitsRow: 0,
        slot,
        index: step,
        seed: 1,
        params: p,
        logprobs: 4,
      }));
      sampler.sample(buffer, rows);
      const snap = await sampler.readBack(true);
      variants.forEach((_, slot) => {
        const want = hosts[slot].next(row, histories[slot]);
        histories[slot].push(want);
        assert.equal(ringId(snap, slot, step), want, `variant ${slot} step ${step}`);
        const got = ringScored(snap, slot, step, 4);
        const host = hosts[slot].score(want, 4);
        assert.ok(Math.abs(got.logprob - host.logprob) < 1e-4, `logprob ${got.logprob} vs ${host.logprob}`);
        assert.deepEqual(got.top.map(([id]) => id), host.top.map(([id]) => id));
        got.top.forEach(([, lp], k) => assert.ok(Math.abs(lp - host.top[k][1]) < 1e-4));
      });
    }
    // Penalised rows drift away from the favourite; the plain one keeps it.
    assert.deepEqual(histories[0].slice(3), new Array(6).fill(order[0]));
    assert.ok(histories[2].slice(3).some((id) => id !== order[0]));
    sampler.destroy();
    device.destroy();
  },
});

Deno.test({
  name: "GPU sampler: temperature, top-k and top-p draw from the host's distribution; seeded draws repeat",
  ignore: !HAS_WEBGPU,
  fn: async () => {
    const row = randomLogits(8);
    const draws = 1024;
    const cases = [
      params({ temperature: 0.8 }),
      params({ temperature: 1.3, topK: 12 }),
      params({ temperature: 0.9, topP: 0.6 }),
      params({ temperature: 1.1, topK: 30, topP: 0.9, repetitionPenalty: 1.4 }),
    ];
    const { device, sampler, buffer } = await gpuSampler(draws, row);
    for (const p of cases) {
      // Every draw its own slot and seed; the repetition penalty reads each slot's prompt.
      const host = new Sampler(p);
      const penalised = Float32Array.from(row);
      if (p.repetitionPenalty !== 1) {
        for (const id of [0, 1, 2]) {
          penalised[id] = row[id] > 0 ? row[id] / p.repetitionPenalty : row[id] * p.repetitionPenalty;
        }
      }
      const { ids, probs } = host.distribution(penalised);
      const rows = Array.from({ length: draws }, (_, slot): SampleRow => {
        sampler.startSequence(slot, [0, 1, 2], p);
        return { logitsRow: 0, slot, index: 0, seed: 1000 + slot, params: p, logprobs: 3 };
      });
      sampler.sample(buffer, rows);
      const snap = await sampler.readBack(true);
      const seen = new Map<number, number>();
      for (let slot = 0; slot < draws; slot++) {
        const id = ringId(snap, slot, 0);
        assert.ok(ids.includes(id), `${JSON.stringify(p)}: drew ${id}, outside the kept set`);
        seen.set(id, (seen.get(id) ?? 0) + 1);
        const scored = ringScored(snap, slot, 0, 3);
        const want = Math.log(probs[ids.indexOf(id)]);
        assert.ok(Math.abs(scored.logprob - want) < 1e-4, `logprob ${scored.logprob} vs ${want}`);
      }
      // Total variation between draws and distribution over the ten likeliest ids and the rest lumped
      // together (a few hundred draws cannot resolve a thousand near-equal ids): ~0.03 expected.
      const bins = ids.slice(0, 10).map((id, k) => [(seen.get(id) ?? 0) / draws, probs[k]]);
      const rest = [1 - bins.reduce((a, [x]) => a + x, 0), 1 - bins.reduce((a, [, y]) => a + y, 0)];
      const tv = [...bins, rest].reduce((d, [x, y]) => d + Math.abs(x - y), 0) / 2;
      assert.ok(tv < 0.08, `${JSON.stringify(p)}: total variation ${tv.toFixed(3)}`);
      // The same seeds draw the same ids (the counts start again from the prompt).
      for (let slot = 0; slot < draws; slot++) sampler.startSequence(slot, [0, 1, 2], p);
      sampler.sample(buffer, rows);
      const again = await sampler.readBack(false);
      for (let slot = 0; slot < draws; slot++) assert.equal(ringId(again, slot, 0), ringId(snap, slot, 0));
    }
    sampler.destroy();
    device.destroy();
  },
});

/** kernels/sample.wgsl's hash, to find the draws whose noise is at an end of its range. */
function kernelHash(x: number): number {
  let h = x >>> 0;
  h = (h ^ (h >>> 16)) >>> 0;
  h = Math.imul(h, 0x7feb352d) >>> 0;
  h = (h ^ (h >>> 15)) >>> 0;
  h = Math.imul(h, 0x846ca68b) >>> 0;
  return (h ^ (h >>> 16)) >>> 0;
}

/** Seeds whose draw of output index 0 hashes some id other than `skip` to bits `extreme` accepts, with that id. */
function seedsWhere(
  extreme: (bits: number) => boolean,
  skip: number,
  count: number,
): { seed: number; id: number }[] {
  const found: { seed: number; id: number }[] = [];
  const index0 = kernelHash(0x632be5ab);
  for (let seed = 1; found.length < count; seed++) {
    const draw = kernelHash(seed ^ index0);
    for (let id = 0; id < VOCAB; id++) {
      if (id !== skip && extreme(kernelHash(draw ^ id))) found.push({ seed, id });
    }
  }
  return found.slice(0, count);
}

Deno.test({
  name:
    "GPU sampler: the noise of a draw is finite at both ends of the hash: no token 30 below the favourite, none masked out",
  ignore: !HAS_WEBGPU,
  fn: async () => {
    const favourite = 7;
    const row = new Float32Array(VOCAB).fill(-30);
    row[favourite] = 0;
    // Top bits all set once rounded u to 1 (infinite noise: that id won whatever its logit or mask);
    // top bits all clear are the largest noise now.
    const cases = [
      ...seedsWhere((h) => h >>> 8 === 0xffffff, favourite, 6),
      ...seedsWhere((h) => h >>> 9 === 0, favourite, 6),
    ];
    const { device, sampler, buffer } = await gpuSampler(2 * cases.length, row);
    // Half the slots are constrained to the favourite and one other id, with the extreme id outside.
    const allowed = (id: number) => [favourite, (id + 1) % VOCAB === favourite ? id + 2 : id + 1];
    const rows: SampleRow[] = cases.flatMap(({ seed, id }, k) => {
      const bits = new Int32Array(Math.ceil(VOCAB / 32));
      for (const a of allowed(id)) bits[a >> 5] |= 1 << (a & 31);
      sampler.setMask(cases.length + k, bits);
      const p = params({ temperature: 1 });
      return [
        { logitsRow: 0, slot: k, index: 0, seed, params: p },
        { logitsRow: 0, slot: cases.length + k, index: 0, seed, params: p, masked: true },
      ];
    });
    sampler.sample(buffer, rows);
    const snap = await sampler.readBack(false);
    cases.forEach(({ seed, id }, k) => {
      assert.equal(ringId(snap, k, 0), favourite, `seed ${seed}: id ${id} is 30 below the favourite`);
      const masked = ringId(snap, cases.length + k, 0);
      assert.ok(allowed(id).includes(masked), `seed ${seed}: drew ${masked}, outside the mask`);
    });
    sampler.destroy();
    device.destroy();
  },
});
