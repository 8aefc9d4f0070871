import { storage, upload } from "../webgpu/device.ts";

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

/**
 * Milliseconds of GPU work per run. Many runs go into one submit, and the time of R runs is taken
 * away from that of 2R, so the fixed cost of a submit and of Deno's ~11 ms completion wait cancels.
 */
export async function timePerRun(
  device: GPUDevice,
  encode: (pass: GPUComputePassEncoder) => void,
  targetMs = 60,
): Promise<number> {
  await timeBatch(device, encode, 2);
  let runs = 4;
  while (runs < 4096 && (await timeBatch(device, encode, runs)) < targetMs) runs *= 2;
  const estimates: number[] = [];
  for (let i = 0; i < 3; i++) {
    const one = await timeBatch(device, encode, runs);
    const two = await timeBatch(device, encode, 2 * runs);
    estimates.push(Math.max(two - one, 1e-6) / runs);
  }
  return estimates.sort((a, b) => a - b)[1];
}

const STREAM_KERNEL = new URL("../../kernels/stream_read.wgsl", import.meta.url);

/** The adapter's streaming-read bandwidth in GB/s: a reduction over a buffer much larger than caches. */
export async function streamingReadGBps(device: GPUDevice, maxBytes = 256 << 20): Promise<number> {
  const bytes = Math.min(maxBytes, device.limits.maxStorageBufferBindingSize, device.limits.maxBufferSize) &
    ~15;
  const src = storage(device, bytes);
  const sink = storage(device, 4 * 256 * 1024);
  const workgroups = 1024;
  const params = upload(device, new Uint32Array([bytes / 16, workgroups * 256, 0, 0]), "uniform");
  const module = device.createShaderModule({ code: await Deno.readTextFile(STREAM_KERNEL) });
  const pipeline = device.createComputePipeline({ layout: "auto", compute: { module, entryPoint: "main" } });
  const group = device.createBindGroup({
    layout: pipeline.getBindGroupLayout(0),
    entries: [src, sink, params].map((buffer, binding) => ({ binding, resource: { buffer } })),
  });
  const ms = await timePerRun(device, (pass) => {
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, group);
    pass.dispatchWorkgroups(workgroups);
  });
  for (const b of [src, sink, params]) b.destroy();
  return bytes / ms / 1e6;
}
