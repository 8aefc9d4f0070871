import { InputError, UserError } from "../errors.ts";

/** An error as it crosses a worker boundary: its message, whether the caller caused it, and which field. */
export interface WorkerError {
  message: string;
  user: boolean;
  field?: string;
}

export function toWorkerError(e: unknown): WorkerError {
  return {
    message: (e as Error).message ?? String(e),
    user: e instanceof UserError,
    ...(e instanceof InputError && e.field ? { field: e.field } : {}),
  };
}

/** Back on this side: the caller's errors stay bad input (4xx, exit 2); the rest are ours. */
export function fromWorkerError(e: WorkerError, context?: string): Error {
  return e.user
    ? new InputError(e.message, e.field)
    : new Error(context ? `${context}: ${e.message}` : e.message);
}
