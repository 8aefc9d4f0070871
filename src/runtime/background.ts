import { BusyError, NotFoundError } from "../errors.ts";

/** What a background worker says: progress now and then, then one result or one error. */
export type JobMessage<R> =
  | { type: "progress"; done: number; total: number; stage?: string }
  | { type: "done"; report: R }
  | { type: "error"; message: string };

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
  private worker: Worker | null = null;

  constructor(readonly kind: string, private readonly script: URL) {}

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
    const end = (status: JobStatus, error: string | null = null) => {
      if (this.worker !== worker) return;
      worker.terminate();
      this.worker = null;
      this.status = status;
      this.error = error;
    };
    worker.onmessage = (e: MessageEvent<JobMessage<R>>) => {
      const m = e.data;
      if (m.type === "progress") this.progress = { done: m.done, total: m.total, stage: m.stage };
      else if (m.type === "done") {
        this.last = m.report;
        end("done");
      } else end("failed", m.message);
    };
    worker.onerror = (e) => {
      e.preventDefault();
      end("failed", e.message);
    };
    worker.postMessage(job);
  }

  /** Ends the running job at once; a NotFoundError when none runs. */
  cancel(): void {
    if (!this.worker) throw new NotFoundError(`no ${this.kind} is running`);
    this.worker.terminate();
    this.worker = null;
    this.status = "cancelled";
    this.error = null;
  }

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
      post({ type: "error", message: (err as Error).message });
    }
  };
}
