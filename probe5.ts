import { requestGpu } from "./src/webgpu/device.ts";
import { benchFfn } from "./src/bench/ffn_bench.ts";
import { checkpointRun, presetRun } from "./src/bench/shapes.ts";
import { loadCheckpoint } from "./src/model/checkpoint.ts";
const gpu = await requestGpu();
console.log(gpu.description, gpu.hasF16);
const t0 = performance.now();
const r = await benchFfn(gpu, checkpointRun(await loadCheckpoint("models/tiny-nas"), 4), {
  tokens: [1, 8, 32],
  weightType: "f32",
  tolerance: 1e-4,
});
console.log(JSON.stringify(r, null, 1), performance.now() - t0);
const r2 = await benchFfn(gpu, presetRun("tiny-nas", 4), {
  tokens: [1, 8],
  weightType: "f16",
  tolerance: 1e-3,
});
console.log(JSON.stringify(r2.cases), performance.now() - t0);
