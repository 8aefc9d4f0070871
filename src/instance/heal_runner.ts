import { tokenLosses } from "../fusion/evaluate.ts";
import type { HealRunner, WindowStatistics } from "../fusion/heal.ts";
import type { Block } from "../model/blocks.ts";
import type { Checkpoint } from "../model/checkpoint.ts";
import { buildStreamGraph, streamName } from "../onnx/decoder.ts";
import { buildDownStatsGraph, buildInputStatsGraph } from "../onnx/heal_graph.ts";
import type { EncodedModel } from "../onnx/builder.ts";
import { createSession, type Device, type ort, runtimeFor } from "../ort/ort.ts";
import { emptyPast, lengthFeeds, withScoringSession } from "../ort/session.ts";
import { yieldIfBusy } from "../yield.ts";

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
      const graph = buildStreamGraph(ckpt, blocks, taps);
      await withSession(device, graph.model, async (session) => {
        for (const [w, ids] of windows.entries()) {
          const feeds: Record<string, ort.Tensor> = {
            input_ids: new rt.Tensor("int32", Int32Array.from(ids), [1, ids.length]),
            ...lengthFeeds(rt, [ids.length]),
            ...Object.fromEntries(emptyPast(rt, graph)),
          };
          await yieldIfBusy();
          const out = await session.run(feeds);
          await each(w, taps.map((i) => out[streamName(i)].data as Float32Array));
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
          each(w, statisticsOf(r));
        }
      });
    },

    async inputStatistics(members, use) {
      const rt = await runtimeFor(device);
      const tensor = (v: Float32Array) => new rt.Tensor("float32", v, [v.length / d, d]);
      return await withSession(
        device,
        buildInputStatsGraph(ckpt.config, members),
        (session) =>
          use(async (x, inputs) => {
            await yieldIfBusy();
            const feeds = Object.fromEntries(inputs.map((m, j) => [`member${j + 1}`, tensor(m)]));
            return statisticsOf(await session.run({ x: tensor(x), ...feeds }));
          }),
      );
    },
  };
}

/** A statistics graph's outputs (onnx/heal_graph.ts), read back. */
function statisticsOf(r: ort.InferenceSession.OnnxValueMapType): WindowStatistics {
  return {
    gram: r.gram.data as Float32Array,
    cross: r.cross.data as Float32Array,
    squares: (r.squares.data as Float32Array)[0],
  };
}
