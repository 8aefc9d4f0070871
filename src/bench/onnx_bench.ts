import { fuseFfns } from "../fusion/apply.ts";
import { buildFfnStackGraph } from "../onnx/decoder.ts";
import { FLOAT_WEIGHTS, type GraphOptions } from "../onnx/format.ts";
import type { Device } from "../ort/ort.ts";
import { createSession, ort } from "../ort/ort.ts";
import { type EncodedModel, storedBytes } from "../onnx/builder.ts";
import { f32ToF16 } from "../model/dtype.ts";
import { rng, spread } from "../numeric.ts";
import type { FfnRun } from "./shapes.ts";
import type { SequentialVsFused } from "./timing.ts";

export interface OnnxFfnCase extends SequentialVsFused {
  rounds: number;
  /** MatMul nodes in each graph: 3k against 3. */
  matmuls: { sequential: number; fused: number };
}

export interface OnnxFfnReport {
  device: Device;
  /** Size of each graph (weights included) and how long onnxruntime took to create its session. */
  graph_mb: number;
  session_create_ms: { sequential: number; fused: number };
  cases: OnnxFfnCase[];
}

async function session(model: EncodedModel, device: Device): Promise<ort.InferenceSession> {
  return await createSession(device, model, {
    executionProviders: [device],
    graphOptimizationLevel: "all",
    preferredOutputLocation: device === "webgpu" ? "gpu-buffer" : "cpu",
    logSeverityLevel: 3,
  });
}

/** Wall time per session.run over at least `minMs`, outputs left on the GPU under WebGPU. */
async function timeRuns(s: ort.InferenceSession, x: ort.Tensor, minMs: number): Promise<number> {
  let runs = 0;
  const t0 = performance.now();
  while (performance.now() - t0 < minMs || runs < 3) {
    const out = await s.run({ x });
    out.y.dispose();
    runs++;
  }
  return (performance.now() - t0) / runs;
}

/** The sequential-vs-fused FFN comparison through onnxruntime-web graphs with the same weights. */
export async function benchOnnxFfn(
  run: FfnRun,
  device: Device,
  tokens: number[],
  rounds: number,
  graph: GraphOptions = FLOAT_WEIGHTS,
): Promise<OnnxFfnReport> {
  const cfg = { hidden: run.d, rmsEps: run.eps };
  const seqGraph = buildFfnStackGraph(cfg, run.blocks, graph);
  const fusedGraph = buildFfnStackGraph(cfg, [fuseFfns(run.blocks)], graph);
  const t0 = performance.now();
  const seq = await session(seqGraph.model, device);
  const t1 = performance.now();
  const fused = await session(fusedGraph.model, device);
  const t2 = performance.now();
  const random = rng(7);
  const cases: OnnxFfnCase[] = [];
  try {
    for (const t of tokens) {
      const values = Float32Array.from({ length: t * run.d }, () => random() * 2 - 1);
      const x = seqGraph.floatType === "float16"
        ? new ort.Tensor("float16", f32ToF16(values), [t, run.d])
        : new ort.Tensor("float32", values, [t, run.d]);
      // Warm both, then alternate them in rounds (order flipping) so drift hits both alike.
      await timeRuns(seq, x, 50);
      await timeRuns(fused, x, 50);
      const ss: number[] = [];
      const fs: number[] = [];
      for (let r = 0; r < rounds; r++) {
        if (r % 2) {
          fs.push(await timeRuns(fused, x, 60));
          ss.push(await timeRuns(seq, x, 60));
        } else {
          ss.push(await timeRuns(seq, x, 60));
          fs.push(await timeRuns(fused, x, 60));
        }
      }
      const s = spread(ss);
      const f = spread(fs);
      cases.push({
        tokens: t,
        sequential_ms: s.median,
        fused_ms: f.median,
        speedup: s.median / f.median,
        sequential_range_ms: [s.min, s.max],
        fused_range_ms: [f.min, f.max],
        rounds,
        matmuls: { sequential: seqGraph.matmulCount, fused: fusedGraph.matmulCount },
      });
    }
  } finally {
    await seq.release();
    await fused.release();
  }
  return {
    device,
    graph_mb: (seqGraph.model.graph.length + storedBytes(seqGraph.model)) / 1e6,
    session_create_ms: { sequential: t1 - t0, fused: t2 - t1 },
    cases,
  };
}
