/// <reference lib="deno.worker" />
/**
 * Writing the active plan's checkpoint off the serving thread (GET /export): fusing every group's
 * weights and writing them out takes seconds to minutes at 1B-8B scale.
 */
import "./worker_location.ts";
import { serveJob } from "./background.ts";
import { assetsFrom } from "../instance/build.ts";
import { exportCheckpoint, type ExportJob, type ExportSummary } from "../export/write.ts";

serveJob<ExportJob, ExportSummary>(async (job, progress) => {
  progress(0, 1, "fusing and writing");
  const assets = await assetsFrom(job.checkpoint, job.modelDir, job.calibrationText);
  return await exportCheckpoint({ assets, plan: job.plan, out: job.out, dtype: job.dtype, force: true });
});
