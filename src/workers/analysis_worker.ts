/// <reference lib="deno.worker" />
/**
 * Runs an analysis off the serving thread: it is minutes of float64 arithmetic, which on the main
 * thread would stall every stream in flight. The weights are read from the checkpoint's files here.
 */
import "./worker_location.ts";
import { attachFiles } from "../model/safetensors.ts";
import { TextTokenizer } from "../model/tokenizer.ts";
import { serveJob } from "./background.ts";
import { frontierFromText } from "../instance/plan_scorer.ts";
import { analyzeText } from "../fusion/analyze.ts";
import { type AnalysisWithFrontier, blockCandidates } from "../fusion/frontier.ts";
import type { AnalysisJob } from "../requests/analysis.ts";

serveJob<AnalysisJob, AnalysisWithFrontier>(async (job, progress) => {
  attachFiles(job.checkpoint);
  const tokenizer = await TextTokenizer.load(job.modelDir);
  const report: AnalysisWithFrontier = await analyzeText(
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
