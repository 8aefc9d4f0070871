/// <reference lib="deno.worker" />
import { unfusedBlocks } from "../model/blocks.ts";
import { loadCheckpoint } from "../model/checkpoint.ts";
import { TextTokenizer } from "../model/tokenizer.ts";
import { analyzeModel, type SuggestOptions } from "./analyze.ts";
import { type TextSlice, textWindows } from "./calibration.ts";

/**
 * Runs an analysis off the serving thread: it is minutes of float64 arithmetic, which on the main
 * thread would stall every stream in flight.
 */
export interface AnalysisJob {
  modelDir: string;
  textPath: string;
  slice: TextSlice;
  suggest: SuggestOptions;
}

export type AnalysisMessage =
  | { type: "progress"; done: number; total: number }
  | { type: "done"; report: unknown }
  | { type: "error"; message: string };

self.onmessage = async (e: MessageEvent<AnalysisJob>) => {
  const job = e.data;
  const post = (m: AnalysisMessage) => self.postMessage(m);
  try {
    const ckpt = await loadCheckpoint(job.modelDir);
    const tokenizer = await TextTokenizer.load(job.modelDir);
    const slice = { ...job.slice, window: Math.min(job.slice.window, ckpt.config.maxPositions) };
    const sequences = await textWindows(job.textPath, tokenizer, slice);
    const report = await analyzeModel(
      ckpt,
      unfusedBlocks(ckpt),
      sequences,
      job.suggest,
      (done, total) => post({ type: "progress", done, total }),
    );
    post({ type: "done", report });
  } catch (err) {
    post({ type: "error", message: (err as Error).message });
  }
};
