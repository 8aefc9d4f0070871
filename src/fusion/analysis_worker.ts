/// <reference lib="deno.worker" />
/**
 * Runs an analysis off the serving thread: it is minutes of float64 arithmetic, which on the main
 * thread would stall every stream in flight. The weights come from the serving process's shared
 * copy, so nothing is read from disk again.
 */
import type { Checkpoint } from "../model/checkpoint.ts";
import { TextTokenizer } from "../model/tokenizer.ts";
import { serveJob } from "../runtime/background.ts";
import { type AnalysisReport, analyzeText, type SuggestOptions } from "./analyze.ts";
import type { TextSlice } from "./calibration.ts";

export interface AnalysisJob {
  checkpoint: Checkpoint;
  modelDir: string;
  textPath: string;
  slice: TextSlice;
  suggest: SuggestOptions;
}

serveJob<AnalysisJob, AnalysisReport>(async (job, progress) => {
  const tokenizer = await TextTokenizer.load(job.modelDir);
  return await analyzeText(job.checkpoint, tokenizer, job.textPath, job.slice, job.suggest, progress);
});
