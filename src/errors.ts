import type { z } from "zod";

/**
 * An error caused by what the caller gave us (a file, a flag, a request body): the CLI exits 2 on it
 * and the server answers 4xx. Anything else is our bug.
 */
export class InputError extends Error {
  constructor(message: string, readonly status: 400 | 404 | 409 | 413 | 422 | 429 = 400) {
    super(message);
    this.name = "InputError";
  }
}

/** One line per issue, each prefixed with the path of the offending field. */
export function formatZodError(error: z.ZodError): string {
  return error.issues
    .map((issue) => {
      const path = issue.path.length ? issue.path.map(String).join(".") : "(root)";
      return `${path}: ${issue.message}`;
    })
    .join("; ");
}
