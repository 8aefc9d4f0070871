import assert from "node:assert/strict";
import fc from "fast-check";
import { rawRequest, startServer } from "./server_helpers.ts";
import { join } from "node:path";
import { ROOT } from "./helpers.ts";

/** Whatever the body, the answer is a JSON document with a status below 500. */
async function expectHandled(res: Response, what: string): Promise<void> {
  const text = await res.text();
  assert.ok(res.status < 500, `${what}: status ${res.status} ${text.slice(0, 200)}`);
  const body = JSON.parse(text);
  if (res.status >= 400) {
    assert.equal(typeof body.error.message, "string", `${what}: 4xx without an error message`);
  }
}

const anyScalar = fc.oneof(
  fc.string({ maxLength: 20 }),
  fc.integer(),
  fc.double(),
  fc.boolean(),
  fc.constant(null),
  fc.array(fc.integer({ min: -5, max: 5000 }), { maxLength: 4 }),
);

/** Completion bodies near the schema: right keys, values often of the wrong type or out of range. */
const completionBody = fc.record({
  prompt: fc.oneof(
    fc.string({ maxLength: 40 }),
    fc.array(fc.integer({ min: -2, max: 5000 }), { maxLength: 5 }),
    anyScalar,
  ),
  max_tokens: fc.oneof(fc.integer({ min: -3, max: 6 }), anyScalar),
  temperature: fc.oneof(fc.double({ min: -1, max: 6, noNaN: true }), anyScalar),
  top_p: fc.oneof(fc.double({ min: -0.5, max: 1.5, noNaN: true }), anyScalar),
  top_k: fc.oneof(fc.integer({ min: -3, max: 5000 }), anyScalar),
  repetition_penalty: fc.oneof(fc.double({ min: -1, max: 12, noNaN: true }), anyScalar),
  seed: fc.oneof(fc.integer(), anyScalar),
  stop: fc.oneof(
    fc.string({ maxLength: 80 }),
    fc.array(fc.string({ maxLength: 70 }), { maxLength: 6 }),
    anyScalar,
  ),
  stream: fc.oneof(fc.boolean(), anyScalar),
  n: anyScalar,
  logprobs: fc.oneof(fc.integer({ min: -2, max: 25 }), anyScalar),
  echo: fc.oneof(fc.boolean(), anyScalar),
  extra: anyScalar,
}, { requiredKeys: [] });

/** Chat bodies near the schema: roles, content as text or parts, logprobs, and fields refused. */
const chatBody = fc.record({
  messages: fc.oneof(
    fc.array(
      fc.record({
        role: fc.oneof(fc.constantFrom("system", "developer", "user", "assistant", "tool", "bot"), anyScalar),
        content: fc.oneof(
          fc.string({ maxLength: 40 }),
          fc.array(fc.record({ type: fc.oneof(fc.constant("text"), anyScalar), text: anyScalar }), {
            maxLength: 3,
          }),
          anyScalar,
        ),
        tool_calls: fc.oneof(
          fc.array(
            fc.record({
              id: fc.oneof(fc.string({ maxLength: 8 }), anyScalar),
              type: fc.oneof(fc.constant("function"), anyScalar),
              function: fc.record({
                name: fc.oneof(fc.constantFrom("f", "g"), anyScalar),
                arguments: fc.oneof(fc.constant('{"a": 1}'), fc.string({ maxLength: 8 }), anyScalar),
              }, { requiredKeys: [] }),
            }, { requiredKeys: [] }),
            { maxLength: 2 },
          ),
          anyScalar,
        ),
        tool_call_id: fc.oneof(fc.string({ maxLength: 8 }), anyScalar),
      }, { requiredKeys: [] }),
      { maxLength: 4 },
    ),
    anyScalar,
  ),
  max_tokens: fc.oneof(fc.integer({ min: -3, max: 6 }), anyScalar),
  max_completion_tokens: fc.oneof(fc.integer({ min: -3, max: 6 }), anyScalar),
  logprobs: fc.oneof(fc.boolean(), anyScalar),
  top_logprobs: fc.oneof(fc.integer({ min: -2, max: 25 }), anyScalar),
  tools: fc.oneof(
    fc.array(
      fc.record({
        type: fc.oneof(fc.constant("function"), anyScalar),
        function: fc.record({
          name: fc.oneof(fc.constantFrom("f", "g", "a b"), anyScalar),
          parameters: fc.oneof(
            fc.constant({ type: "object", properties: { a: { type: "integer", minimum: 0, maximum: 9 } } }),
            fc.constant({ type: "object", properties: { a: { type: "nonsense" } } }),
            fc.constant({ type: "string" }),
            anyScalar,
          ),
        }, { requiredKeys: ["name"] }),
      }, { requiredKeys: [] }),
      { maxLength: 3 },
    ),
    anyScalar,
  ),
  tool_choice: fc.oneof(
    fc.constantFrom("auto", "none", "required"),
    fc.record({ type: fc.constant("function"), function: fc.record({ name: fc.constantFrom("f", "g") }) }),
    anyScalar,
  ),
  parallel_tool_calls: fc.oneof(fc.boolean(), anyScalar),
  response_format: fc.oneof(fc.record({ type: fc.constantFrom("text", "json_object") }), anyScalar),
  stream: fc.oneof(fc.boolean(), anyScalar),
  extra: anyScalar,
}, { requiredKeys: [] });

const planBody = fc.record({
  version: fc.oneof(fc.constant(1), anyScalar),
  ffn_groups: fc.oneof(
    fc.array(fc.array(fc.integer({ min: -2, max: 14 }), { maxLength: 5 }), { maxLength: 4 }),
    anyScalar,
  ),
  other: anyScalar,
}, { requiredKeys: [] });

Deno.test({
  name: "fuzz: malformed completion, plan and raw bodies always get a 2xx/4xx JSON answer, never a 5xx",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const server = await startServer([
      "--device",
      "wasm",
      "--max-tokens-cap",
      "6",
      "--request-timeout",
      "10",
      "--chat-template",
      join(ROOT, "tests", "fixtures", "chat", "llama-3.1-8b-instruct.jinja"),
    ]);
    await server.ready;
    const send = (path: string, body: string) =>
      fetch(`${server.base}${path}`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body,
      });
    try {
      await fc.assert(
        fc.asyncProperty(completionBody, async (b) => {
          await expectHandled(await send("/v1/completions", JSON.stringify(b)), JSON.stringify(b));
        }),
        { numRuns: 250, seed: 20261124 },
      );
      await fc.assert(
        fc.asyncProperty(chatBody, async (b) => {
          await expectHandled(await send("/v1/chat/completions", JSON.stringify(b)), JSON.stringify(b));
        }),
        { numRuns: 200, seed: 20261126 },
      );
      await fc.assert(
        fc.asyncProperty(fc.jsonValue({ maxDepth: 3 }), async (b) => {
          await expectHandled(await send("/v1/completions", JSON.stringify(b)), JSON.stringify(b));
        }),
        { numRuns: 150, seed: 1 },
      );
      await fc.assert(
        fc.asyncProperty(fc.string({ maxLength: 60 }), async (raw) => {
          for (const path of ["/v1/completions", "/v1/chat/completions", "/fuse", "/analysis", "/bench"]) {
            await expectHandled(await send(path, raw), `${path} ${raw}`);
          }
        }),
        { numRuns: 100, seed: 2 },
      );
      await fc.assert(
        fc.asyncProperty(planBody, async (b) => {
          await expectHandled(await send("/fuse", JSON.stringify(b)), JSON.stringify(b));
        }),
        { numRuns: 120, seed: 3 },
      );
      await fc.assert(
        fc.asyncProperty(
          fc.constantFrom("/analysis", "/bench"),
          fc.jsonValue({ maxDepth: 2 }),
          async (path, b) => {
            const res = await send(path, JSON.stringify(b));
            await expectHandled(res, `${path} ${JSON.stringify(b)}`);
            // A body that happened to start a job: end it, so the fuzzing measures the server, not the job.
            if (res.status === 202) {
              await fetch(`${server.base}${path}`, { method: "DELETE" }).then((r) => r.body?.cancel());
            }
          },
        ),
        { numRuns: 80, seed: 4 },
      );
      const metricsBefore = (await (await fetch(`${server.base}/metrics`)).text()).length;
      const token = fc.stringMatching(/^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,40}$/);
      const headerValue = fc.stringMatching(/^[\x20-\x7e]{0,80}$/);
      await fc.assert(
        fc.asyncProperty(
          token,
          fc.constantFrom(
            "/v1/completions",
            "/v1/chat/completions",
            "/fuse",
            "/bench",
            "/analysis",
            "/health",
            "/metrics",
            "/x",
          ),
          headerValue,
          fc.oneof(fc.constant(`127.0.0.1:${server.port}`), headerValue),
          headerValue,
          async (method, path, contentType, host, authorization) => {
            const head = [
              `${method} ${path} HTTP/1.1`,
              `host: ${host}`,
              `content-type: ${contentType}`,
              `authorization: ${authorization}`,
            ].join("\r\n");
            const { status } = await rawRequest(server.port, head, '{"prompt":"x","max_tokens":1}');
            if (status === 202) {
              await fetch(`${server.base}${path}`, { method: "DELETE" }).then((r) => r.body?.cancel());
            }
            assert.ok(status >= 200 && status < 500, `${status} for ${head}`);
          },
        ),
        { numRuns: 200, seed: 5 },
      );
      const metricsAfter = (await (await fetch(`${server.base}/metrics`)).text()).length;
      assert.ok(metricsAfter - metricsBefore < 4000, `/metrics grew ${metricsAfter - metricsBefore} bytes`);
      const health = await fetch(`${server.base}/health`);
      assert.equal(health.status, 200, "still serving after the fuzzing");
      await health.body?.cancel();
      const statuses = server.events.filter((e) => e.event === "request").map((e) => e.status as number);
      assert.ok(statuses.length >= 800);
      assert.ok(statuses.every((s) => s < 500), "no 5xx in the request log");
    } finally {
      await server.stop();
    }
  },
});
