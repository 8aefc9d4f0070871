import { tokenLosses } from "../fusion/evaluate.ts";
import type { HealRunner } from "../fusion/heal.ts";
import { type Block, cachedLayers } from "../model/blocks.ts";
import type { Checkpoint } from "../model/checkpoint.ts";
import { buildStreamGraph, pastKey, pastValue, streamName } from "../onnx/decoder.ts";
import { buildDownStatsGraph } from "../onnx/heal_graph.ts";
import type { EncodedModel } from "../onnx/builder.ts";
import { createSession, type Device, type ort, runtimeFor } from "./ort.ts";
import { withScoringSession } from "./session.ts";
import { yieldIfBusy } from "./yield.ts";

/** Runs `use` on a session of `model` on `device`, and frees the session however `use` ends. */
async function withSession<T>(
  device: Device,
  model: EncodedModel,
  use: (s: ort.InferenceSession) => Promise<T>,
): Promise<T> {
  const session = await createSession(device, model, {
    executionProviders: [device],
    graphOptimizationLevel: "all",
    logSeverityLevel: 3,
  });
  try {
    return await use(session);
  } finally {
    await session.release();
  }
}

/**
 * What healing runs through the model, on the device the plan is built for: held-out losses of
 * candidate models, the residual streams a fit reads, and the down projection's statistics (read back
 * to the host, where the fits are solved). Healing runs in a build worker, so these sessions never
 * share the serving thread.
 */
export function healRunner(ckpt: Checkpoint, heldout: number[][], device: Device = "wasm"): HealRunner {
  const d = ckpt.config.hidden;
  return {
    lossesOf: (blocks) =>
      withScoringSession(
        ckpt,
        blocks,
        (s) => tokenLosses(heldout, ckpt.config.vocabSize, (ids) => s.logitsOf(ids)),
        device,
      ),

    async streams(blocks: Block[], windows: number[][], taps: number[], each) {
      const rt = await runtimeFor(device);
      const used = blocks.slice(0, Math.max(...taps));
      await withSession(device, buildStreamGraph(ckpt, blocks, taps), async (session) => {
        for (const [w, ids] of windows.entries()) {
          const t = ids.length;
          const feeds: Record<string, ort.Tensor> = {
            input_ids: new rt.Tensor("int64", BigInt64Array.from(ids, BigInt), [1, t]),
            attention_mask: new rt.Tensor("int64", new BigInt64Array(t).fill(1n), [1, t]),
            position_ids: new rt.Tensor("int64", BigInt64Array.from({ length: t }, (_, i) => BigInt(i)), [
              1,
              t,
            ]),
          };
          for (const { layer, kvHeads } of cachedLayers(used)) {
            const empty = () =>
              new rt.Tensor("float32", new Float32Array(0), [1, kvHeads, 0, ckpt.config.headDim]);
            feeds[pastKey(layer)] = empty();
            feeds[pastValue(layer)] = empty();
          }
          await yieldIfBusy();
          const out = await session.run(feeds);
          each(w, taps.map((i) => out[streamName(i)].data as Float32Array));
        }
      });
    },

    async downStatistics(ffn, io, each) {
      const rt = await runtimeFor(device);
      await withSession(device, buildDownStatsGraph(ckpt.config, ffn), async (session) => {
        for (const [w, { t, x, out }] of io.entries()) {
          await yieldIfBusy();
          const r = await session.run({
            x: new rt.Tensor("float32", x, [t, d]),
            out: new rt.Tensor("float32", out, [t, d]),
          });
          each(w, {
            gram: r.gram.data as Float32Array,
            cross: r.cross.data as Float32Array,
            squares: (r.squares.data as Float32Array)[0],
          });
        }
      });
    },
  };
}
