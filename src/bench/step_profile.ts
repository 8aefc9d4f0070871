import { type Spread, spread } from "../numeric.ts";
import type { ModelInstance } from "../instance/build.ts";
import { ort } from "../ort/ort.ts";
import { DEFAULT_SAMPLING } from "../sampling/sampling.ts";
import { asBatch } from "../ort/session.ts";
import { yieldedMs } from "../yield.ts";
import { GpuCounters, GpuTimestamps } from "../webgpu/counters.ts";

/** Where one decode step of `batch` rows goes: what it asks of the device, and its host and GPU time. */
export interface StepProfile {
  device: string;
  plan: string;
  batch: number;
  steps: number;
  /** Nodes of the decoder graph. */
  nodes: number;
  /** Per step (WebGPU; null on the CPU): compute dispatches, queue submits, GPU readbacks, bind groups made, buffer writes. */
  dispatches: number | null;
  submits: number | null;
  readbacks: number | null;
  bind_groups: number | null;
  writes: number | null;
  /**
   * The step's JS and WASM time on the host, without the time spent inside queue.submit (where a
   * software adapter runs the kernels) or giving the event loop its turn (src/yield.ts).
   */
  host_ms: Spread;
  /** The GPU's time from the step's first command to its last (timestamp queries); null without them. */
  gpu_ms: Spread | null;
}

/**
 * Profiles `steps` decode steps of `batch` rows that continue `prompt`, after a warm-up: through
 * the instance's SlotDecoder and GPU sampler as its engine runs them (WebGPU), or its session's
 * batched step with host sampling (WASM, native). The instance's engine must be idle.
 */
export async function profileSteps(
  inst: ModelInstance,
  prompt: number[],
  batch: number,
  steps: number,
): Promise<StepProfile> {
  const base = { device: inst.device, plan: inst.planId, batch, steps, nodes: inst.nodeCount };
  if (inst.decoder) return { ...base, ...await profileGpu(inst, prompt, batch, steps) };
  const s = inst.session!;
  const prefix = (await s.step(prompt, s.emptyCache(), "last")).cache;
  let cache = await s.packRows(
    Array.from({ length: batch }, () => ({ cache: asBatch(prefix), row: 0 })),
    prompt.length + steps + 3,
  );
  const ids = new Array<number>(batch).fill(prompt.at(-1)!);
  const ms: number[] = [];
  for (let k = 0; k < steps + 2; k++) {
    const y0 = yieldedMs();
    const t0 = performance.now();
    const r = await s.decodeBatch(ids, cache);
    cache = r.cache;
    if (k >= 2) ms.push(performance.now() - t0 - (yieldedMs() - y0));
  }
  const none = { dispatches: null, submits: null, readbacks: null, bind_groups: null, writes: null };
  return { ...base, ...none, host_ms: spread(ms), gpu_ms: null };
}

async function profileGpu(inst: ModelInstance, prompt: number[], batch: number, steps: number) {
  const dec = inst.decoder!;
  if (batch > dec.layout.slots) {
    throw new Error(`batch ${batch} needs ${batch} slots; the instance has ${dec.layout.slots}`);
  }
  if (prompt.length + steps + 2 >= dec.layout.capacity) {
    throw new Error("the prompt and the steps do not fit a slot");
  }
  await dec.prefill(prompt, 0);
  const lengths = new Map<number, number>();
  const params = DEFAULT_SAMPLING;
  for (let slot = 0; slot < batch; slot++) {
    dec.join(slot, prompt.length);
    dec.sampler.startSequence(slot, prompt, params);
    dec.sampler.sample(dec.prefillLogits, [{ logitsRow: 0, slot, index: 0, seed: 1, params }]);
    lengths.set(slot, prompt.length);
  }
  const bucket = dec.bucketFor(batch - 1);
  const device = await ort.env.webgpu.device as GPUDevice;
  const stamps = GpuTimestamps.available(device) ? new GpuTimestamps(device, 2 * steps) : null;
  const counters = new GpuCounters();
  const host: number[] = [];
  const per = { dispatches: 0, submits: 0, readbacks: 0, bind_groups: 0, writes: 0 };
  counters.install();
  try {
    for (let k = 0; k < steps + 2; k++) {
      const measured = k >= 2;
      if (measured) stamps?.mark();
      counters.reset();
      const y0 = yieldedMs();
      const t0 = performance.now();
      await dec.decode(lengths, bucket);
      dec.sampler.sample(
        dec.decodeLogits,
        [...lengths.keys()].map((slot) => ({ logitsRow: slot, slot, index: k + 1, seed: 1, params })),
      );
      const wall = performance.now() - t0 - (yieldedMs() - y0);
      const c = counters.reset();
      if (measured) {
        stamps?.mark();
        host.push(wall - c.submitMs);
        per.dispatches += c.dispatches;
        per.submits += c.submits;
        per.readbacks += c.readbacks;
        per.bind_groups += c.bindGroups;
        per.writes += c.writes;
      }
      for (const slot of lengths.keys()) lengths.set(slot, lengths.get(slot)! + 1);
    }
  } finally {
    counters.uninstall();
  }
  const gpu = stamps ? spread(await stamps.read()) : null;
  stamps?.destroy();
  await dec.sampler.readBack(false);
  const each = (n: number) => n / steps;
  return {
    dispatches: each(per.dispatches),
    submits: each(per.submits),
    readbacks: each(per.readbacks),
    bind_groups: each(per.bind_groups),
    writes: each(per.writes),
    host_ms: spread(host),
    gpu_ms: gpu,
  };
}
