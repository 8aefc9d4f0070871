/// <reference lib="deno.worker" />
/**
 * The self-benchmark off the serving thread: it builds sessions and saturates a core for seconds to
 * minutes, which on the main thread would freeze every stream and /health.
 */
import "./worker_location.ts";
import { serveJob } from "./background.ts";
import { type BenchOptions, type BenchReport, runBench } from "../bench/run.ts";

serveJob<BenchOptions, BenchReport>((opts, progress) => {
  let step = 0;
  return runBench(opts, (stage) => progress(++step, 4, stage));
});
