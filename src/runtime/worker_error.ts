import { InputError, UserError } from "../errors.ts";

/** An error as it crosses a worker boundary: its message, and whether the caller caused it. */
export interface WorkerError {
  message: string;
  user: boolean;
}

export function toWorkerError(e: unknown): WorkerError {
  return { message: (e as Error).message ?? String(e), user: e instanceof UserError };
}

/** Back on this side: the caller's errors stay bad input (4xx, exit 2); the rest are ours. */
export function fromWorkerError(e: WorkerError, context?: string): Error {
  return e.user ? new InputError(e.message) : new Error(context ? `${context}: ${e.message}` : e.message);
}
