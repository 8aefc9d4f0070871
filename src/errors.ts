import type { z } from "zod";

/**
 * Errors caused by what a caller gave or asked for. The CLI exits 2 on every one; `src/server/`
 * maps each kind to its HTTP status. Anything that is not a UserError is our bug.
 */
export class UserError extends Error {
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}

/**
 * A value that is wrong as given: a flag, a body field, a prompt, a file. `field` names the request
 * field (its wire name, e.g. `max_tokens`); each edge shows it its own way (`--max-tokens` on the CLI).
 */
export class InputError extends UserError {
  constructor(message: string, readonly field?: string) {
    super(message);
  }
}

/** A checkpoint directory that cannot be loaded as it is. */
export class BadCheckpointError extends InputError {}

/** A fusion plan that breaks a rule for this model; the active plan stays. */
export class InvalidPlanError extends InputError {}

/** Something asked for that does not exist (yet): no analysis run, no benchmark. */
export class NotFoundError extends UserError {}

/** A single-flight job of this kind is already running, or a newer request replaced this one. */
export class BusyError extends UserError {}

/** Admission refused for now: every slot and queue place is taken. */
export class CapacityError extends UserError {
  constructor(message: string, readonly retryAfterSeconds: number) {
    super(message);
  }
}

/** The service cannot take work at the moment: loading, failed, or draining for shutdown. */
export class UnavailableError extends UserError {}

/** The caller went away (or cancelled) before the work was done. */
export class CancelledError extends UserError {}

/**
 * A request body's schema failure as an InputError naming its first offending field (the `param` of an
 * OpenAI error), the message listing every issue.
 */
export function bodyError(error: z.ZodError): InputError {
  const [first, ...rest] = error.issues.flatMap(specific);
  const field = first.path.length
    ? first.path.map(String).join(".")
    : first.code === "unrecognized_keys"
    ? String(first.keys[0])
    : undefined;
  if (!field) return new InputError(formatZodError(error));
  const head = first.code === "unrecognized_keys" ? "unknown" : first.message;
  const tail = rest.length ? `; ${formatIssues(rest)}` : "";
  return new InputError(head + tail, field);
}

/** One line per issue, each prefixed with the path of the offending field. */
export function formatZodError(
  error: z.ZodError,
  name = (path: PropertyKey[]) => path.map(String).join("."),
): string {
  return formatIssues(error.issues, name);
}

/**
 * A union's failure as the failure of the one branch whose type the value has (`stop` with 5 strings:
 * the array's limit), where "Invalid input" would say nothing.
 */
function specific(issue: z.core.$ZodIssue): z.core.$ZodIssue[] {
  if (issue.code !== "invalid_union") return [issue];
  const typed = issue.errors.filter((b) => !b.every((i) => i.code === "invalid_type" && !i.path.length));
  if (typed.length !== 1) return [issue];
  return typed[0].flatMap((i) => specific({ ...i, path: [...issue.path, ...i.path] }));
}

function formatIssues(
  issues: z.core.$ZodIssue[],
  name = (path: PropertyKey[]) => path.map(String).join("."),
): string {
  return issues
    .flatMap(specific)
    .map((issue) => {
      if (issue.code === "unrecognized_keys") {
        return `${issue.keys.map((k) => name([...issue.path, k])).join(", ")}: unknown`;
      }
      const path = issue.path.length ? name(issue.path) : "(root)";
      return `${path}: ${issue.message}`;
    })
    .join("; ");
}
