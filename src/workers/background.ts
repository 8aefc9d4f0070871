import { BusyError, InputError, NotFoundError } from "../errors.ts";
import { toWorkerError, type WorkerError } from "./worker_error.ts";

/** What a background worker says: progress now and then, then one result or one error. */
export type JobMessage<R> =
  | { type: "progress"; done: number; total: number; stage?: string }
  | { type: "done"; report: R }
  | { type: "error" } & WorkerError;

export type JobStatus = "none" | "running" | "done" | "failed" | "cancelled";

export interface JobProgress {
  done: number;
  total: number;
  stage?: string;
}

/**
 * One kind of heavy job (an analysis, a benchmark) run in a worker of its own: single-flight (a
 * second start is a BusyError), cancellable (the worker is ended wherever it is), and the last
 * result kept for reading. Nothing of the job runs on the serving thread.
 */
export class BackgroundJob<J, R> {
  status: JobStatus = "none";
  last: R | null = null;
  progress: JobProgress | null = null;
  error: string | null = null;
  /** The last failure as an error of its kind: the caller's (an InputError naming its field) or ours. */
  failure: Error | null = null;
  private worker: Worker | null = null;
  private ended: Promise<JobStatus> = Promise.resolve("none");

  constructor(readonly kind: string, private readonly script: URL) {}

  /** The kind without its article ("an analysis": "analysis"), for "no analysis is running". */
  get noun(): string {
    return this.kind.replace(/^an? /, "");
  }

  get running(): boolean {
    return this.worker !== null;
  }

  start(job: J): void {
    if (this.worker) throw new BusyError(`${this.kind} is already running; DELETE it first or wait`);
    const worker = new Worker(this.script.href, { type: "module" });
    this.worker = worker;
    this.status = "running";
    this.progress = { done: 0, total: 1 };
    this.error = null;
    this.failure = null;
    const { promise, resolve } = Promise.withResolvers<JobStatus>();
    this.ended = promise;
    this.settle = resolve;
    const end = (status: JobStatus, error: WorkerError | null = null) => {
      if (this.worker !== worker) return;
      worker.terminate();
      this.worker = null;
      this.status = status;
      this.error = error?.message ?? null;
      this.failure = error
        ? (error.user ? new InputError(error.message, error.field) : new Error(error.message))
        : null;
      resolve(status);
    };
    worker.onmessage = (e: MessageEvent<JobMessage<R>>) => {
      const m = e.data;
      if (m.type === "progress") this.progress = { done: m.done, total: m.total, stage: m.stage };
      else if (m.type === "done") {
        this.last = m.report;
        end("done");
      } else end("failed", m);
    };
    worker.onerror = (e) => {
      e.preventDefault();
      end("failed", { message: e.message, user: false });
    };
    worker.postMessage(job);
  }

  /** Ends the running job at once; a NotFoundError when none runs. */
  cancel(): void {
    if (!this.worker) throw new NotFoundError(`no ${this.noun} is running`);
    this.worker.terminate();
    this.worker = null;
    this.status = "cancelled";
    this.error = null;
    this.settle("cancelled");
  }

  /** Resolves with how the job started last ended (at once when none runs). */
  wait(): Promise<JobStatus> {
    return this.ended;
  }

  private settle: (status: JobStatus) => void = () => {};

  /** For shutdown: ends a running job, if any. */
  stop(): void {
    if (this.worker) this.cancel();
  }
}

/** The worker side: runs `work` on the one job message it gets and reports back. */
export function serveJob<J, R>(
  work: (job: J, progress: (done: number, total: number, stage?: string) => void) => Promise<R>,
): void {
  const scope = self as unknown as Worker;
  const post = (m: JobMessage<R>) => scope.postMessage(m);
  scope.onmessage = async (e: MessageEvent<J>) => {
    try {
      post({
        type: "done",
        report: await work(e.data, (done, total, stage) => post({ type: "progress", done, total, stage })),
      });
    } catch (err) {
      post({ type: "error", ...toWorkerError(err) });
    }
  };
}
