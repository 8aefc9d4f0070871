/// <reference lib="deno.worker" />
/**
 * Runs an analysis off the serving thread: it is minutes of float64 arithmetic, which on the main
 * thread would stall every stream in flight. The weights are read from the checkpoint's files here.
 */
import "../runtime/worker_location.ts";
import type { Checkpoint } from "../model/checkpoint.ts";
import { attachFiles } from "../model/safetensors.ts";
import { TextTokenizer } from "../model/tokenizer.ts";
import { serveJob } from "../runtime/background.ts";
import { frontierFromText, type FrontierRequest } from "../runtime/plan_scorer.ts";
import { type AnalysisReport, analyzeText, type SuggestOptions } from "./analyze.ts";
import { blockCandidates } from "./frontier.ts";
import type { TextSlice } from "./calibration.ts";

export interface AnalysisJob {
  checkpoint: Checkpoint;
  modelDir: string;
  textPath: string;
  slice: TextSlice;
  suggest: SuggestOptions;
  /** Also measure the speed/quality frontier (sessions built here, in this worker). */
  frontier?: FrontierRequest;
}

serveJob<AnalysisJob, AnalysisReport>(async (job, progress) => {
  attachFiles(job.checkpoint);
  const tokenizer = await TextTokenizer.load(job.modelDir);
  const report = await analyzeText(
    job.checkpoint,
    tokenizer,
    job.textPath,
    job.slice,
    job.suggest,
    (done, total) => progress(done, total, "dependency matrix: forward passes"),
  );
  if (job.frontier) {
    report.frontier = await frontierFromText(
      job.checkpoint,
      tokenizer,
      job.textPath,
      job.slice,
      { ...job.frontier, blockGroups: blockCandidates(report.analysis, job.frontier.maxWidth) },
      (done, total) => progress(done, total, "frontier: plans measured"),
    );
  }
  return report;
});
