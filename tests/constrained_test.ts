import assert from "node:assert/strict";
import { Ajv } from "ajv";
import { join } from "node:path";
import { BatchEngine } from "../src/decode/batch_engine.ts";
import { EAGER_GRAMMAR_VOCAB } from "../src/decode/engine_base.ts";
import type { TextTokenizer } from "../src/model/tokenizer.ts";
import type { ModelSession } from "../src/ort/session.ts";
import type { GrammarSpec, VocabularyInfo } from "../src/sampling/grammar.ts";
import { ROOT } from "./helpers.ts";
import { post, readSse, startServer } from "./server_helpers.ts";

/** Schemas with every common keyword; strings and numbers bounded so an answer ends within max_tokens. */
const SCHEMAS: Record<string, Record<string, unknown>> = {
  nested: {
    type: "object",
    properties: {
      user: {
        type: "object",
        properties: {
          name: { type: "string", maxLength: 10 },
          age: { type: "integer", minimum: 0, maximum: 99 },
        },
        required: ["name", "age"],
        additionalProperties: false,
      },
      active: { type: "boolean" },
    },
    required: ["user", "active"],
    additionalProperties: false,
  },
  array: {
    type: "array",
    items: { type: "integer", minimum: 1, maximum: 9 },
    minItems: 2,
    maxItems: 4,
  },
  enumConst: {
    type: "object",
    properties: { kind: { const: "point" }, color: { enum: ["red", "green", "blue"] } },
    required: ["kind", "color"],
    additionalProperties: false,
  },
  anyOf: {
    anyOf: [
      {
        type: "object",
        properties: { n: { type: "integer", minimum: 0, maximum: 9 } },
        required: ["n"],
        additionalProperties: false,
      },
      { type: "string", maxLength: 8 },
    ],
  },
  refs: {
    $defs: { id: { type: "string", pattern: "^[a-z]{2}[0-9]{2}$" } },
    type: "object",
    properties: {
      a: { $ref: "#/$defs/id" },
      b: { type: "array", items: { $ref: "#/$defs/id" }, maxItems: 2 },
    },
    required: ["a", "b"],
    additionalProperties: false,
  },
};

Deno.test({
  name:
    "constrained decoding: every answer under a JSON schema, a regex, a choice or a grammar parses and validates",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async (t) => {
    const server = await startServer([
      "--device",
      "wasm",
      "--chat-template",
      join(ROOT, "tests", "fixtures", "chat", "llama-3.1-8b-instruct.jinja"),
    ]);
    const { base } = server;
    await server.ready;
    const ajv = new Ajv();
    const complete = async (body: Record<string, unknown>) => {
      const res = await post(base, "/v1/completions", { prompt: "def main(", max_tokens: 160, ...body });
      const json = await res.json();
      assert.equal(res.status, 200, JSON.stringify(json));
      return json.choices as { text: string; finish_reason: string }[];
    };
    try {
      await t.step(
        "JSON schemas: nested objects, arrays, enums and const, anyOf, $ref with pattern",
        async () => {
          for (const [name, schema] of Object.entries(SCHEMAS)) {
            const validate = ajv.compile(schema);
            for (const seed of [1, 2]) {
              const choices = await complete({
                response_format: { type: "json_schema", json_schema: { name, schema, strict: true } },
                temperature: 1,
                seed,
                n: 2,
              });
              for (const c of choices) {
                assert.equal(c.finish_reason, "stop", `${name}: ${c.text}`);
                const value = JSON.parse(c.text);
                assert.ok(validate(value), `${name} ${c.text}: ${ajv.errorsText(validate.errors)}`);
              }
            }
          }
          // vLLM's guided_json, the schema as text, greedy.
          const [greedy] = await complete({ guided_json: JSON.stringify(SCHEMAS.enumConst), temperature: 0 });
          assert.ok(ajv.validate(SCHEMAS.enumConst, JSON.parse(greedy.text)), greedy.text);
        },
      );

      await t.step("json_object, guided_choice, guided_regex and guided_grammar", async () => {
        const [obj] = await complete({ response_format: { type: "json_object" }, temperature: 0 });
        assert.equal(typeof JSON.parse(obj.text), "object");
        for (const seed of [1, 2, 3]) {
          const [choice] = await complete({ guided_choice: ["yes", "no", "not sure"], temperature: 1, seed });
          assert.ok(["yes", "no", "not sure"].includes(choice.text), choice.text);
          const [code] = await complete({ guided_regex: "[a-z]{3}-[0-9]{2}", temperature: 1, seed });
          assert.match(code.text, /^[a-z]{3}-[0-9]{2}$/);
          const [sum] = await complete({
            guided_grammar: 'root ::= num " + " num " = " num\nnum ::= [1-9] [0-9]?',
            temperature: 1,
            seed,
          });
          assert.match(sum.text, /^[1-9][0-9]? \+ [1-9][0-9]? = [1-9][0-9]?$/);
        }
      });

      await t.step(
        "streamed, the pieces join to an answer that validates; logprobs are of allowed tokens",
        async () => {
          const res = await post(base, "/v1/completions", {
            prompt: "x = ",
            max_tokens: 160,
            temperature: 1,
            seed: 7,
            stream: true,
            logprobs: 3,
            response_format: { type: "json_schema", json_schema: { name: "n", schema: SCHEMAS.nested } },
          });
          const sse = await readSse(res);
          assert.ok(sse.done);
          assert.ok(ajv.validate(SCHEMAS.nested, JSON.parse(sse.text)), sse.text);
          for (const e of sse.events) {
            const lp = (e.choices as { logprobs: { token_logprobs: number[] } | null }[])[0]?.logprobs;
            // The mask leaves the chosen token a finite log-probability under the constrained distribution.
            for (const v of lp?.token_logprobs ?? []) assert.ok(Number.isFinite(v) && v <= 0, `${v}`);
          }
        },
      );

      await t.step("chat: response_format json_schema, as OpenAI's structured outputs", async () => {
        const res = await post(base, "/v1/chat/completions", {
          messages: [{ role: "user", content: "Describe a user." }],
          response_format: {
            type: "json_schema",
            json_schema: { name: "user", schema: SCHEMAS.nested, strict: true },
          },
          max_tokens: 160,
          temperature: 1,
          seed: 5,
        });
        const body = await res.json();
        assert.equal(res.status, 200, JSON.stringify(body));
        const message = body.choices[0].message.content;
        assert.ok(ajv.validate(SCHEMAS.nested, JSON.parse(message)), message);
      });

      await t.step("unconstrained answers are unchanged beside constrained ones", async () => {
        const plain = { prompt: "import os\n", max_tokens: 24, temperature: 0 };
        const before = (await (await post(base, "/v1/completions", plain)).json()).choices[0].text;
        const [, beside] = await Promise.all([
          complete({ guided_choice: ["a", "b"], temperature: 0 }),
          post(base, "/v1/completions", plain).then((r) => r.json()),
        ]);
        assert.equal(beside.choices[0].text, before);
      });

      await t.step(
        "a schema or grammar the engine refuses, or two at once, is a 400 naming the field",
        async () => {
          for (
            const [body, param, re] of [
              [
                {
                  response_format: {
                    type: "json_schema",
                    json_schema: { name: "x", schema: { type: "nonsense" } },
                  },
                },
                "response_format",
                /cannot be compiled: .*nonsense/,
              ],
              [{ guided_grammar: "root ::= (" }, "guided_grammar", /cannot be compiled: EBNF parser error/],
              [{ guided_choice: [] }, "guided_choice", /guided_choice/],
              [
                { guided_regex: "a", guided_choice: ["b"] },
                "guided_choice",
                /one constraint a request: guided_regex/,
              ],
              [{ response_format: { type: "xml" } }, "response_format.type", /response_format/],
            ] as const
          ) {
            const res = await post(base, "/v1/completions", { prompt: "x", max_tokens: 4, ...body });
            assert.equal(res.status, 400, JSON.stringify(body));
            const err = (await res.json()).error;
            assert.equal(err.param, param);
            assert.match(err.message, re);
          }
        },
      );
    } finally {
      await server.stop();
    }
  },
});

Deno.test("grammar tables: built while idle for a large vocabulary, at the first grammar for a small one", async () => {
  const engineWith = (vocabSize: number) => {
    let built = 0;
    const tokenizer = {
      vocabularyInfo: (n: number): VocabularyInfo => {
        built++;
        return { tokens: Array.from({ length: n }, (_, i) => `t${i}`), kind: "raw" };
      },
    };
    const session = { vocabSize, graph: { cache: [], headDim: 64, floatType: "float32" } };
    const engine = new BatchEngine(
      session as unknown as ModelSession,
      tokenizer as unknown as TextTokenizer,
      [0],
      1024,
    );
    return { engine, built: () => built };
  };
  const spec: GrammarSpec = { field: "guided_regex", type: "regex", pattern: "t1" };
  const large = engineWith(EAGER_GRAMMAR_VOCAB);
  await large.engine.prepareGrammars();
  assert.equal(large.built(), 1, "the tables are built before any request");
  await large.engine.checkGrammar(spec);
  assert.equal(large.built(), 1, "and the first grammar finds them");
  const small = engineWith(4096);
  await small.engine.prepareGrammars();
  assert.equal(small.built(), 0, "a small vocabulary waits for its first grammar");
  await small.engine.checkGrammar(spec);
  assert.equal(small.built(), 1);
});
