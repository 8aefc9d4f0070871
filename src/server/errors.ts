import type { Context } from "hono";
import { HTTPException } from "hono/http-exception";
import type { ContentfulStatusCode } from "hono/utils/http-status";
import {
  BusyError,
  CancelledError,
  CapacityError,
  InputError,
  NotFoundError,
  UnavailableError,
  UserError,
} from "../errors.ts";

/** nginx's "client closed request": logged and counted, never seen by the client that left. */
export const CLIENT_CLOSED = 499;

/** OpenAI's error envelope, so OpenAI clients surface our messages as they are. */
export function errorBody(message: string, type = "invalid_request_error", param: string | null = null) {
  return { error: { message, type, param, code: null } };
}

export function errorResponse(
  c: Context,
  status: ContentfulStatusCode,
  message: string,
  type?: string,
  param: string | null = null,
): Response {
  return c.json(errorBody(message, type, param), status);
}

/** The one place domain errors become HTTP statuses. */
export function statusOf(err: UserError): ContentfulStatusCode {
  if (err instanceof InputError) return 400;
  if (err instanceof NotFoundError) return 404;
  if (err instanceof BusyError) return 409;
  if (err instanceof CapacityError) return 429;
  if (err instanceof UnavailableError) return 503;
  if (err instanceof CancelledError) return CLIENT_CLOSED as ContentfulStatusCode;
  return 400;
}

const TYPES: Partial<Record<number, string>> = {
  429: "rate_limit_error",
  503: "server_error",
  499: "cancelled",
};

/** The app's one error handler: domain errors map to their status, anything else is logged as ours. */
export function onError(err: Error, c: Context): Response {
  if (err instanceof HTTPException) return err.getResponse();
  if (err instanceof UserError) {
    if (err instanceof CapacityError) c.header("retry-after", String(err.retryAfterSeconds));
    const status = statusOf(err);
    const field = err instanceof InputError ? err.field : undefined;
    const message = field ? `${field}: ${err.message}` : err.message;
    return errorResponse(c, status, message, TYPES[status], field ?? null);
  }
  console.error(`internal error on ${c.req.method} ${c.req.path}:`, err);
  return errorResponse(c, 500, `internal error: ${err.message}`, "server_error");
}
