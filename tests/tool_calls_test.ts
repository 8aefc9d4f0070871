import assert from "node:assert/strict";
import { Ajv } from "ajv";
import { join } from "node:path";
import { ChatTemplate, readChatTemplate } from "../src/model/chat_template.ts";
import {
  detectToolFormat,
  HERMES,
  inlineTools,
  LLAMA3_JSON,
  NEMOTRON,
  parseToolCalls,
  templateKnowsTools,
  templateTools,
  type ToolCallEvent,
  type ToolCallFormat,
  ToolCallParser,
  toolCallTag,
  type ToolFunction,
} from "../src/model/tool_calls.ts";
import { DEFAULT_TEMPLATE_LIMITS, TemplateSandbox } from "../src/serving/template_sandbox.ts";
import { ROOT, TINY_NAS } from "./helpers.ts";
import { post, readSse, startServer } from "./server_helpers.ts";

const CHAT = join(ROOT, "tests", "fixtures", "chat");
/** ChatML as shipped for the models that come without a template: it renders no tools. */
const CHATML = join(ROOT, "templates", "chatml.jinja");
const template = (name: string) => Deno.readTextFile(name === "chatml.jinja" ? CHATML : join(CHAT, name));

/** Two functions whose arguments end within a few tokens (bounded strings and numbers). */
const FUNCTIONS: ToolFunction[] = [
  {
    name: "get_weather",
    description: "The weather in a city over the next days.",
    parameters: {
      type: "object",
      properties: {
        city: { type: "string", maxLength: 12 },
        days: { type: "integer", minimum: 1, maximum: 7 },
        unit: { enum: ["C", "F"] },
      },
      required: ["city", "days"],
      additionalProperties: false,
    },
  },
  {
    name: "get_time",
    parameters: {
      type: "object",
      properties: { zone: { type: "string", pattern: "^[A-Z]{3}$" } },
      required: ["zone"],
      additionalProperties: false,
    },
  },
];
const TOOLS = templateTools(FUNCTIONS);
const NAMES = FUNCTIONS.map((f) => f.name);

/** A call as a format writes it. */
const written = (f: ToolCallFormat, name: string, args: string) =>
  `{"name": "${name}", "${f.argsKey}": ${args}}`;

/** Every way a text can be cut into two pieces gives the same events, joined, as the whole text. */
function joined(events: ToolCallEvent[]) {
  let text = "";
  const calls: { name: string; arguments: string }[] = [];
  for (const e of events) {
    if (e.type === "text") text += e.text;
    else if (e.type === "call") calls[e.index] = { name: e.name, arguments: "" };
    else calls[e.index].arguments += e.text;
  }
  return { text, calls };
}

Deno.test("tool calls: each format's answer is read the same whole and in pieces cut anywhere", () => {
  const weather = '{"city": "Oslo \\"}\\" x", "days": 3}';
  const time = '{"zone": "UTC"}';
  const answers: [ToolCallFormat, string, string[]][] = [
    [
      HERMES,
      `Let me look. <tool_call>\n${written(HERMES, "get_weather", weather)}\n</tool_call>\n` +
      `<tool_call>\n${written(HERMES, "get_time", time)}\n</tool_call>`,
      ["get_weather", "get_time"],
    ],
    [
      NEMOTRON,
      `<TOOLCALL>[${written(NEMOTRON, "get_weather", weather)}, ${
        written(NEMOTRON, "get_time", time)
      }]</TOOLCALL>`,
      ["get_weather", "get_time"],
    ],
    [LLAMA3_JSON, written(LLAMA3_JSON, "get_time", time), ["get_time"]],
  ];
  for (const [format, text, names] of answers) {
    const whole = parseToolCalls(format, NAMES, text);
    assert.deepEqual(whole.calls.map((c) => c.name), names, format.name);
    for (const c of whole.calls) assert.ok(JSON.parse(c.arguments), c.arguments);
    assert.equal(whole.content, format === HERMES ? "Let me look." : "");
    for (let cut = 0; cut <= text.length; cut++) {
      const parser = new ToolCallParser(format, NAMES);
      const events = [...parser.push(text.slice(0, cut)), ...parser.push(text.slice(cut)), ...parser.end()];
      const got = joined(events);
      assert.deepEqual(
        got.calls,
        whole.calls.map((c) => ({ name: c.name, arguments: c.arguments })),
        `${cut}`,
      );
      assert.equal(got.text.trim(), whole.content, `${format.name} cut at ${cut}`);
    }
    // A character at a time: prose goes out as soon as it cannot start a call.
    const parser = new ToolCallParser(format, NAMES);
    const events = [...text].flatMap((ch) => parser.push(ch)).concat(parser.end());
    assert.deepEqual(joined(events).calls.length, names.length);
  }
});

Deno.test("tool calls: prose that only looks like a call's start, an answer cut short", () => {
  const prose = parseToolCalls(HERMES, NAMES, "a <tool and <b> then <tool_ca");
  assert.deepEqual(prose, { content: "a <tool and <b> then <tool_ca", calls: [] });
  const cut = parseToolCalls(HERMES, NAMES, `<tool_call>\n{"name": "get_time", "arguments": {"zone": "U`);
  assert.equal(cut.calls.length, 1);
  assert.equal(cut.calls[0].arguments, '{"zone": "U');
  // Text the grammar would never allow after a marker is prose, not a call.
  const odd = parseToolCalls(HERMES, NAMES, `<tool_call>\n{"name": "other", "arguments": {}}`);
  assert.equal(odd.calls.length, 0);
  assert.match(odd.content, /other/);
  assert.deepEqual(new ToolCallParser(HERMES, NAMES).push("plain text "), [{
    type: "text",
    text: "plain text",
  }]);
});

Deno.test("tool calls: the format is read from the template's markers; Hermes where it knows no tools", async () => {
  assert.equal(detectToolFormat(await template("llama-3.1-8b-instruct.jinja")), LLAMA3_JSON);
  assert.equal(detectToolFormat(await template("nemotron-super-49b-v1.5.jinja")), NEMOTRON);
  assert.equal(detectToolFormat(await template("chatml.jinja")), HERMES);
  // A comment that names tools is not code that renders them.
  assert.equal(templateKnowsTools("{# no tools here #}{{ messages[0].content }}"), false);
  assert.equal(templateKnowsTools("{% for t in tools %}{{ t }}{% endfor %}"), true);
});

Deno.test("tool calls: the structural tag per tool_choice and format", () => {
  const req = (choice: "auto" | "none" | "required" | { name: string }, parallel = true) => ({
    functions: FUNCTIONS,
    choice,
    parallel,
  });
  assert.equal(toolCallTag(HERMES, req("none")), null);
  const auto = toolCallTag(HERMES, req("auto"))!.format as Record<string, unknown>;
  assert.equal(auto.type, "triggered_tags");
  assert.deepEqual(auto.triggers, ["<tool_call>"]);
  // A named function: one call of it.
  const named = toolCallTag(HERMES, req({ name: "get_time" }))!.format as {
    type: string;
    elements: { begin: string }[];
  };
  assert.equal(named.type, "or");
  assert.deepEqual(named.elements.map((t) => t.begin), ['<tool_call>\n{"name": "get_time", "arguments": ']);
  // One call a turn: a choice between the calls, no separator.
  assert.equal((toolCallTag(HERMES, req("required", false))!.format as { type: string }).type, "or");
  assert.equal((toolCallTag(LLAMA3_JSON, req("required"))!.format as { type: string }).type, "or");
  const list = toolCallTag(NEMOTRON, req("required"))!.format as { begin: string; end: string };
  assert.deepEqual([list.begin, list.end], ["<TOOLCALL>[", "]</TOOLCALL>"]);
  // auto with a constrained answer: calls, or the answer's own format.
  const either = toolCallTag(HERMES, req("auto"), { type: "regex", pattern: "x" })!.format as {
    type: string;
    elements: unknown[];
  };
  assert.equal(either.type, "or");
  assert.deepEqual(either.elements[1], { type: "regex", pattern: "x" });
});

Deno.test("tool calls: rendered by the template that knows tools, by the default prompt otherwise", async () => {
  const conversation = [
    { role: "user", content: "Weather in Oslo?" },
    {
      role: "assistant",
      content: "",
      tool_calls: [{
        id: "call_1",
        type: "function" as const,
        function: { name: "get_weather", arguments: { city: "Oslo", days: 1 } },
      }],
    },
    { role: "tool", content: '{"temp": 4}', tool_call_id: "call_1" },
    { role: "tool", content: '{"wind": 9}', tool_call_id: "call_1" },
  ];
  const llama = await readChatTemplate(TINY_NAS, await template("llama-3.1-8b-instruct.jinja"));
  const chatml = await readChatTemplate(TINY_NAS, await template("chatml.jinja"));
  for (const src of [llama!, chatml!]) {
    const sandbox = await TemplateSandbox.open(src, DEFAULT_TEMPLATE_LIMITS, null);
    try {
      const direct = ChatTemplate.compile(src);
      const expected = src === llama
        ? direct.render(conversation, true, { tools: TOOLS })
        : direct.render(inlineTools(conversation, FUNCTIONS), true);
      assert.equal(await sandbox.render(conversation, true, FUNCTIONS), expected);
      assert.match(expected, /get_weather/);
      assert.match(expected, /"city": "Oslo"/);
    } finally {
      sandbox.close();
    }
  }
  const inlined = inlineTools(conversation, FUNCTIONS);
  assert.equal(inlined[0].role, "system");
  assert.match(inlined[0].content, /<tools>\n\{"type": "function", "function": \{"name": "get_weather"/);
  assert.equal(
    inlined[2].content,
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}\n</tool_call>',
  );
  // Consecutive results are one user turn.
  assert.equal(inlined.length, 4);
  assert.equal(inlined[3].role, "user");
  assert.match(inlined[3].content, /<tool_response>\n\{"temp": 4\}\n<\/tool_response>\n<tool_response>/);
});

interface Call {
  id: string;
  type: string;
  function: { name: string; arguments: string };
}

/** A streamed answer's tool calls, accumulated as OpenAI's clients accumulate them. */
function streamedCalls(events: Record<string, unknown>[]) {
  const calls: Call[] = [];
  let content = "";
  let finish = "";
  for (const e of events) {
    for (const c of e.choices as { delta: Record<string, unknown>; finish_reason: string | null }[]) {
      if (c.finish_reason) finish = c.finish_reason;
      content += (c.delta.content as string | undefined) ?? "";
      for (const d of (c.delta.tool_calls ?? []) as (Partial<Call> & { index: number })[]) {
        calls[d.index] ??= { id: d.id!, type: d.type!, function: { name: d.function!.name!, arguments: "" } };
        calls[d.index].function.arguments += d.function?.arguments ?? "";
      }
    }
  }
  return { calls, content, finish };
}

for (
  const [name, file] of [
    ["Hermes, the default for a template that knows no tools", "chatml.jinja"],
    ["Llama 3.1's JSON calls", "llama-3.1-8b-instruct.jinja"],
    ["Nemotron's <TOOLCALL> list", "nemotron-super-49b-v1.5.jinja"],
  ]
) {
  Deno.test({
    name: `tool calls over HTTP, ${name}: valid calls of listed functions, streamed as OpenAI streams them`,
    sanitizeResources: false,
    sanitizeOps: false,
    fn: async (t) => {
      const server = await startServer([
        "--device",
        "wasm",
        "--chat-template",
        file === "chatml.jinja" ? CHATML : join(CHAT, file),
      ]);
      const { base } = server;
      await server.ready;
      const ajv = new Ajv();
      const validators = new Map(FUNCTIONS.map((f) => [f.name, ajv.compile(f.parameters)]));
      const chat = async (body: Record<string, unknown>) => {
        const res = await post(base, "/v1/chat/completions", {
          messages: [{ role: "user", content: "What is the weather in Oslo?" }],
          tools: TOOLS,
          max_tokens: 120,
          ...body,
        });
        const json = await res.json();
        assert.equal(res.status, 200, JSON.stringify(json));
        return json;
      };
      const valid = (calls: Call[], names = NAMES) => {
        assert.ok(calls.length >= 1);
        for (const c of calls) {
          assert.equal(c.type, "function");
          assert.match(c.id, /^call_[A-Za-z0-9]{24}$/);
          assert.ok(names.includes(c.function.name), c.function.name);
          const validate = validators.get(c.function.name)!;
          let args: unknown;
          assert.doesNotThrow(() => args = JSON.parse(c.function.arguments), JSON.stringify(calls));
          assert.ok(validate(args), `${c.function.arguments}: ${ajv.errorsText(validate.errors)}`);
        }
      };
      try {
        await t.step("required and a named function: calls only, each valid; n and seeds", async () => {
          // Three seeded choices (seed, seed + 1, seed + 2): three samples of the constrained distribution.
          const body = await chat({ tool_choice: "required", parallel_tool_calls: false, seed: 1, n: 3 });
          for (const c of body.choices) {
            assert.equal(c.finish_reason, "tool_calls", JSON.stringify(c));
            assert.equal(c.message.content, null);
            assert.equal(c.message.tool_calls.length, 1);
            valid(c.message.tool_calls);
          }
          const named = await chat({
            tool_choice: { type: "function", function: { name: "get_time" } },
            temperature: 1,
            seed: 4,
          });
          assert.equal(named.choices[0].finish_reason, "tool_calls");
          assert.equal(named.choices[0].message.tool_calls.length, 1);
          valid(named.choices[0].message.tool_calls, ["get_time"]);
        });

        await t.step("streamed: the deltas add up to the whole answer's calls", async () => {
          const body = { tool_choice: "required", parallel_tool_calls: false, temperature: 0 };
          const whole = (await chat(body)).choices[0];
          const res = await post(base, "/v1/chat/completions", {
            messages: [{ role: "user", content: "What is the weather in Oslo?" }],
            tools: TOOLS,
            max_tokens: 120,
            stream: true,
            logprobs: true,
            ...body,
          });
          const sse = await readSse(res);
          assert.ok(sse.done);
          const got = streamedCalls(sse.events);
          assert.equal(got.finish, "tool_calls");
          assert.equal(got.content, "");
          assert.deepEqual(
            got.calls.map((c) => c.function),
            whole.message.tool_calls.map((c: Call) => c.function),
          );
          valid(got.calls);
          // Logprobs ride on the deltas: one per generated token in all.
          const tokens = sse.events.flatMap((e) =>
            (e.choices as { logprobs: { content: unknown[] } | null }[]).flatMap((c) =>
              c.logprobs?.content ?? []
            )
          );
          const usage = sse.events.at(-1)!.usage as { completion_tokens: number } | undefined;
          if (usage) assert.ok(tokens.length >= usage.completion_tokens - 1, `${tokens.length}`);
        });

        await t.step(
          "parallel calls where the format has them; auto leaves the choice to the model",
          async () => {
            const body = await chat({ tool_choice: "required", temperature: 1, seed: 9, max_tokens: 200 });
            const c = body.choices[0];
            if (c.finish_reason === "tool_calls") valid(c.message.tool_calls);
            for (const seed of [1, 2]) {
              const auto = (await chat({ temperature: 1, seed })).choices[0];
              if (auto.message.tool_calls) valid(auto.message.tool_calls);
              else assert.equal(typeof auto.message.content, "string");
            }
            const none = (await chat({ tool_choice: "none", temperature: 0, max_tokens: 8 })).choices[0];
            assert.equal(none.message.tool_calls, undefined);
            assert.equal(typeof none.message.content, "string");
          },
        );

        await t.step("POST /tokenize with tools counts what the chat completion's prompt is", async () => {
          const messages = [{ role: "user", content: "What is the weather in Oslo?" }];
          const counted = await (await post(base, "/tokenize", { messages, tools: TOOLS })).json();
          const plain = await (await post(base, "/tokenize", { messages })).json();
          const used = (await chat({ tool_choice: "none", max_tokens: 1 })).usage.prompt_tokens;
          assert.equal(counted.count, used);
          assert.ok(plain.count < used);
        });

        await t.step("a conversation with calls and results goes back to the model", async () => {
          const body = await chat({
            messages: [
              { role: "user", content: "Weather in Oslo?" },
              {
                role: "assistant",
                content: null,
                tool_calls: [{
                  id: "call_1",
                  type: "function",
                  function: { name: "get_weather", arguments: '{"city": "Oslo", "days": 1}' },
                }],
              },
              { role: "tool", tool_call_id: "call_1", content: '{"temp": 4}' },
            ],
            tool_choice: "none",
            max_tokens: 4,
          });
          assert.equal(body.choices.length, 1);
        });

        await t.step("auto with response_format: calls, or an answer under the schema", async () => {
          const schema = {
            type: "object",
            properties: { answer: { enum: ["yes", "no"] } },
            required: ["answer"],
            additionalProperties: false,
          };
          for (const seed of [1, 2]) {
            const c = (await chat({
              response_format: { type: "json_schema", json_schema: { name: "a", schema } },
              temperature: 1,
              seed,
            })).choices[0];
            if (c.message.tool_calls) valid(c.message.tool_calls);
            else assert.ok(ajv.validate(schema, JSON.parse(c.message.content)), c.message.content);
          }
        });

        if (file !== "chatml.jinja") return;
        await t.step("bad tools, choices and messages are 400s naming the field", async () => {
          const fn = (
            over: Record<string, unknown>,
          ) => [{ type: "function", function: { name: "f", ...over } }];
          for (
            const [body, param, re] of [
              [{ tools: fn({ name: "a b" }) }, "tools.0.function.name", /letters, digits/],
              [{ tools: [...TOOLS, TOOLS[0]] }, "tools", /two functions have one name/],
              [{ tools: fn({ parameters: { type: "string" } }) }, "tools.0.function.parameters", /object/],
              [
                {
                  tools: fn({ parameters: { type: "object", properties: { a: { type: "nonsense" } } } }),
                  tool_choice: "required",
                },
                "tools",
                /cannot be compiled/,
              ],
              [
                { tool_choice: { type: "function", function: { name: "nope" } } },
                "tool_choice",
                /names no function/,
              ],
              [{ tools: undefined, tool_choice: "required" }, "tool_choice", /needs tools/],
              [
                { messages: [{ role: "tool", content: "x" }] },
                "messages.0.tool_call_id",
                /needs the id/,
              ],
              [
                {
                  messages: [{
                    role: "assistant",
                    tool_calls: [{ id: "c", type: "function", function: { name: "f", arguments: "{oops" } }],
                  }],
                },
                "messages.0.tool_calls.0.function.arguments",
                /not JSON/,
              ],
              [{ functions: [{ name: "f" }] }, "functions", /not supported/],
            ] as const
          ) {
            const res = await post(base, "/v1/chat/completions", {
              messages: [{ role: "user", content: "hi" }],
              tools: TOOLS,
              max_tokens: 4,
              ...body,
            });
            const json = await res.json();
            assert.equal(res.status, 400, JSON.stringify(body));
            assert.equal(json.error.param, param, JSON.stringify(json));
            assert.match(json.error.message, re);
          }
        });
      } finally {
        await server.stop();
      }
    },
  });
}
