import { storage, upload } from "../webgpu/device.ts";
import { compileKernel } from "../webgpu/shader.ts";
import { type Spread, spread } from "../numeric.ts";

/** One token count of a sequential-against-fused comparison: medians over rounds, and their ranges. */
export interface SequentialVsFused {
  tokens: number;
  sequential_ms: number;
  fused_ms: number;
  sequential_range_ms: [number, number];
  fused_range_ms: [number, number];
  speedup: number;
}

async function timeBatch(
  device: GPUDevice,
  encode: (pass: GPUComputePassEncoder) => void,
  runs: number,
): Promise<number> {
  const enc = device.createCommandEncoder();
  const pass = enc.beginComputePass();
  for (let i = 0; i < runs; i++) encode(pass);
  pass.end();
  const t0 = performance.now();
  device.queue.submit([enc.finish()]);
  await device.queue.onSubmittedWorkDone();
  return performance.now() - t0;
}

type Encode = (pass: GPUComputePassEncoder) => void;

/** Runs per submit such that one submit takes about `targetMs` of GPU time. */
async function calibrate(device: GPUDevice, encode: Encode, targetMs: number): Promise<number> {
  await timeBatch(device, encode, 2);
  let runs = 4;
  while (runs < 4096 && (await timeBatch(device, encode, runs)) < targetMs) runs *= 2;
  return runs;
}

/** One estimate: R runs taken away from 2R cancels the fixed cost of a submit and its completion wait. */
async function estimate(device: GPUDevice, encode: Encode, runs: number): Promise<number> {
  const one = await timeBatch(device, encode, runs);
  const two = await timeBatch(device, encode, 2 * runs);
  return Math.max(two - one, 1e-6) / runs;
}

/**
 * Milliseconds of GPU work per run for each encoder. Many runs go into one submit, and the variants
 * are measured in alternating rounds (at least 3, up to 9, within about `budgetMs`) so that drift in
 * the machine's load hits them alike; each result is the median and range of its rounds.
 */
export async function timePerRun(
  device: GPUDevice,
  encoders: Encode[],
  targetMs = 60,
  budgetMs = 3000,
): Promise<Spread[]> {
  const runs: number[] = [];
  for (const e of encoders) runs.push(await calibrate(device, e, targetMs));
  const samples: number[][] = encoders.map(() => []);
  const t0 = performance.now();
  for (let round = 0; round < 9 && (round < 3 || performance.now() - t0 < budgetMs); round++) {
    for (const [i, e] of encoders.entries()) samples[i].push(await estimate(device, e, runs[i]));
  }
  return samples.map(spread);
}

/** The adapter's streaming-read bandwidth in GB/s: a reduction over a buffer much larger than caches. */
export async function streamingReadGBps(device: GPUDevice, maxBytes = 256 << 20): Promise<number> {
  const bytes = Math.min(maxBytes, device.limits.maxStorageBufferBindingSize, device.limits.maxBufferSize) &
    ~15;
  const src = storage(device, bytes);
  const sink = storage(device, 4 * 256 * 1024);
  const workgroups = 1024;
  const params = upload(device, new Uint32Array([bytes / 16, workgroups * 256, 0, 0]), "uniform");
  const module = await compileKernel(device, "stream_read.wgsl");
  const pipeline = device.createComputePipeline({ layout: "auto", compute: { module, entryPoint: "main" } });
  const group = device.createBindGroup({
    layout: pipeline.getBindGroupLayout(0),
    entries: [src, sink, params].map((buffer, binding) => ({ binding, resource: { buffer } })),
  });
  const [{ median: ms }] = await timePerRun(device, [(pass) => {
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, group);
    pass.dispatchWorkgroups(workgroups);
  }]);
  for (const b of [src, sink, params]) b.destroy();
  return bytes / ms / 1e6;
}
