import type { Context, Next } from "hono";
import { HTTPException } from "hono/http-exception";
import type { z } from "zod";
import { bodyError, InputError } from "../errors.ts";
import { errorBody } from "./errors.ts";
import type { AppEnv } from "./logging.ts";
import { yieldIfBusy } from "../yield.ts";

const refusal = (status: 408 | 413, message: string, type: string) =>
  new HTTPException(status, {
    res: new Response(JSON.stringify(errorBody(message, type)), {
      status,
      // The rest of the body is not read: the connection cannot carry another request.
      headers: { "content-type": "application/json", connection: "close" },
    }),
  });

/**
 * Bounds every request body: a declared length over `maxBytes` is 413 at once; the body itself is
 * bounded where it is read (`readBody`), in size and in time, so a client sending a byte a second
 * holds a request for `timeoutMs` at most. Not Hono's bodyLimit: it reads chunked bodies before
 * the route with no bound in time. Deno's server has no deadline for the headers themselves
 * (denoland/deno#3515): that needs a proxy in front.
 */
export function bodyLimits(maxBytes: number, timeoutMs: number) {
  return async (c: Context<AppEnv>, next: Next) => {
    const declared = Number(c.req.header("content-length") ?? 0);
    if (declared > maxBytes) throw tooLarge(maxBytes);
    c.set("body", { maxBytes, timeoutMs, since: performance.now() });
    await next();
  };
}

const tooLarge = (maxBytes: number) =>
  refusal(413, `request body exceeds ${maxBytes} bytes`, "invalid_request_error");

/** The body's text, read within the request's limits (408 when late, 413 when too large). */
async function bodyText(c: Context<AppEnv>): Promise<string> {
  const limits = c.get("body");
  const stream = c.req.raw.body;
  if (!limits || !stream) return await c.req.text();
  const reader = stream.getReader();
  const left = limits.since + limits.timeoutMs - performance.now();
  let late = false;
  const timer = setTimeout(() => {
    late = true;
    reader.cancel().catch(() => {});
  }, Math.max(0, left));
  const chunks: Uint8Array[] = [];
  let size = 0;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (late) break;
      if (done) break;
      size += value.length;
      if (size > limits.maxBytes) {
        reader.cancel().catch(() => {});
        throw tooLarge(limits.maxBytes);
      }
      chunks.push(value);
    }
  } catch (e) {
    if (!late) throw e;
  } finally {
    clearTimeout(timer);
  }
  if (late) {
    throw refusal(408, `the request body did not arrive within ${limits.timeoutMs / 1000} s`, "timeout");
  }
  const bytes = new Uint8Array(size);
  let at = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, at);
    at += chunk.length;
  }
  return new TextDecoder().decode(bytes);
}

/** No request of this API nests deeper; a body that does is refused before it is parsed. */
export const MAX_JSON_DEPTH = 64;

/**
 * How deep `text`'s arrays and objects nest, counted until it passes `limit`: one pass over the
 * text, where JSON.parse of 400,000 levels holds the thread for a third of a second. Strings are
 * crossed by a native search for their end (a megabyte prompt is one string).
 */
export function jsonDepth(text: string, limit = MAX_JSON_DEPTH): number {
  const stringEnd = /["\\]/g;
  let depth = 0;
  let max = 0;
  for (let i = 0; i < text.length; i++) {
    const ch = text.charCodeAt(i);
    if (ch === 34) {
      stringEnd.lastIndex = i + 1;
      for (;;) {
        const found = stringEnd.exec(text);
        // Unterminated: JSON.parse says so.
        if (!found) return max;
        // A backslash escapes the character after it.
        if (text.charCodeAt(found.index) === 92) stringEnd.lastIndex = found.index + 2;
        else {
          i = found.index;
          break;
        }
      }
    } else if (ch === 91 || ch === 123) {
      if (++depth > max && (max = depth) > limit) return max;
    } else if (ch === 93 || ch === 125) depth--;
  }
  return max;
}

/**
 * Reads a JSON body and validates it; every failure is an InputError naming the field. A body that
 * arrives too late or too large fails as the middleware that bounds it says (408, 413).
 */
export async function readBody<S extends z.ZodType>(c: Context<AppEnv>, schema: S): Promise<z.infer<S>> {
  const text = await bodyText(c);
  // Megabyte bodies arriving together are each milliseconds of work: other requests get turns between.
  await yieldIfBusy();
  if (jsonDepth(text) > MAX_JSON_DEPTH) {
    throw new InputError(`request body nests deeper than ${MAX_JSON_DEPTH} levels`);
  }
  await yieldIfBusy();
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw new InputError(`request body is not valid JSON: ${(e as Error).message}`);
  }
  const parsed = schema.safeParse(raw);
  if (!parsed.success) throw bodyError(parsed.error);
  return parsed.data;
}
