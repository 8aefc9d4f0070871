/// <reference lib="deno.worker" />
/**
 * Writing the active plan's checkpoint off the serving thread (GET /export): fusing every group's
 * weights and writing them out takes seconds to minutes at 1B-8B scale.
 */
import "../runtime/worker_location.ts";
import type { FusionPlan } from "../fusion/plan.ts";
import type { Checkpoint } from "../model/checkpoint.ts";
import { serveJob } from "../runtime/background.ts";
import { assetsFrom } from "../runtime/engine.ts";
import { exportCheckpoint, type ExportDtype, type ExportSummary } from "./write.ts";

export interface ExportJob {
  /** The served checkpoint (file-backed). */
  checkpoint: Checkpoint;
  modelDir: string;
  plan: FusionPlan;
  dtype: ExportDtype;
  /** An empty directory the checkpoint is written into. */
  out: string;
  calibrationText?: string;
}

serveJob<ExportJob, ExportSummary>(async (job, progress) => {
  progress(0, 1, "fusing and writing");
  const assets = await assetsFrom(job.checkpoint, job.modelDir, job.calibrationText);
  return await exportCheckpoint({ assets, plan: job.plan, out: job.out, dtype: job.dtype, force: true });
});
