import type { Context } from "hono";
import type { ContentfulStatusCode } from "hono/utils/http-status";
import type { z } from "zod";
import { formatZodError, InputError } from "../errors.ts";
import { QueueFullError } from "../runtime/scheduler.ts";

/** OpenAI's error envelope, so OpenAI clients surface our messages as they are. */
export function errorBody(message: string, type = "invalid_request_error") {
  return { error: { message, type, code: null } };
}

export function errorResponse(
  c: Context,
  status: ContentfulStatusCode,
  message: string,
  type?: string,
): Response {
  return c.json(errorBody(message, type), status);
}

/** Reads a JSON body and validates it; every failure is an InputError (a 4xx), never a crash. */
export async function readBody<S extends z.ZodType>(c: Context, schema: S): Promise<z.infer<S>> {
  let raw: unknown;
  try {
    raw = JSON.parse(await c.req.text());
  } catch (e) {
    throw new InputError(`request body is not valid JSON: ${(e as Error).message}`);
  }
  const parsed = schema.safeParse(raw);
  if (!parsed.success) throw new InputError(formatZodError(parsed.error));
  return parsed.data;
}

/** The app's one error handler: InputErrors map to their status, anything else is logged as ours. */
export function onError(err: Error, c: Context): Response {
  if (err instanceof QueueFullError) c.header("retry-after", String(err.retryAfterSeconds));
  if (err instanceof InputError) return errorResponse(c, err.status, err.message);
  console.error(`internal error on ${c.req.method} ${c.req.path}:`, err);
  return errorResponse(c, 500, `internal error: ${err.message}`, "server_error");
}
