import assert from "node:assert/strict";
import { Ajv } from "ajv";
import { validatePlan } from "../src/fusion/plan.ts";
import { FLOAT_WEIGHTS, formatName } from "../src/onnx/format.ts";
import { HERMES, NEMOTRON, parseToolCalls, toolCallTag, type ToolFunction } from "../src/model/tool_calls.ts";
import { buildInstance, loadAssets } from "../src/instance/build.ts";
import type { GrammarSpec } from "../src/sampling/grammar.ts";
import { FP32_INT4, FP32_INT8, runToEnd } from "./engine_helpers.ts";
import { EVAL_TEXT, golden, TINY_LLAMA, TINY_NAS } from "./helpers.ts";

const SCHEMA = {
  type: "object",
  properties: {
    name: { type: "string", maxLength: 8 },
    tags: { type: "array", items: { enum: ["a", "b", "c"] }, minItems: 1, maxItems: 3 },
    score: { anyOf: [{ type: "integer", minimum: 0, maximum: 9 }, { type: "null" }] },
  },
  required: ["name", "tags", "score"],
  additionalProperties: false,
};

const FUNCTIONS: ToolFunction[] = [
  {
    name: "lookup",
    parameters: {
      type: "object",
      properties: {
        key: { type: "string", pattern: "^[a-z]{1,6}$" },
        limit: { type: "integer", maximum: 5 },
      },
      required: ["key"],
      additionalProperties: false,
    },
  },
  { name: "ping", parameters: { type: "object", properties: {}, additionalProperties: false } },
];

/** Plan forms per shipped model: fused FFN groups, removed and linear attention, block groups. */
const PLANS: [string, Record<string, unknown>[]][] = [
  [TINY_NAS, [
    { ffn_groups: [[3, 4, 5], [6, 7, 8]] },
    { version: 2, attention: { remove: [9] }, ffn_groups: [[8, 9]] },
    { version: 2, attention: { linear: [2] }, ffn_groups: [[2, 3, 4]] },
    { version: 2, block_groups: [[9, 10]] },
  ]],
  [TINY_LLAMA, [
    { version: 2, attention: { remove: [3, 4] }, ffn_groups: [[2, 3, 4]] },
    { version: 2, block_groups: [[5, 6]] },
  ]],
];

Deno.test({
  name: "constrained decoding on both shipped models, every plan form, quantized too: answers validate",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const ajv = new Ajv();
    const validate = ajv.compile(SCHEMA);
    const grammars: [string, GrammarSpec][] = [
      ["schema", { field: "response_format", type: "json_schema", schema: JSON.stringify(SCHEMA) }],
      ...[HERMES, NEMOTRON].map((f): [string, GrammarSpec] => [
        f.name,
        {
          field: "tools",
          type: "structural_tag",
          tag: JSON.stringify(toolCallTag(f, { functions: FUNCTIONS, choice: "required", parallel: false })),
        },
      ]),
    ];
    for (const [dir, plans] of PLANS) {
      const assets = await loadAssets(dir, {}, EVAL_TEXT);
      const prompt = (await golden(dir)).cases[0].input_ids;
      for (const raw of plans) {
        const plan = validatePlan(raw, assets.checkpoint.config);
        // Quantized weights on the default model's first plan: the grammar sees only the logits.
        const quantized = dir === TINY_NAS && raw === plans[0];
        for (const format of quantized ? [FLOAT_WEIGHTS, FP32_INT8, FP32_INT4] : [FLOAT_WEIGHTS]) {
          const instance = await buildInstance(assets, plan, "wasm", format);
          try {
            for (const [kind, grammar] of grammars) {
              const name = `${dir.split("/").at(-1)} ${JSON.stringify(raw)} ${formatName(format)} ${kind}`;
              const { summary } = await runToEnd(instance.engine, prompt, {
                grammar,
                maxTokens: 96,
                temperature: 1,
                seed: 5,
              });
              assert.equal(summary.finishReason, "stop", `${name}: ${summary.text}`);
              if (kind === "schema") {
                assert.ok(validate(JSON.parse(summary.text)), `${name}: ${summary.text}`);
                continue;
              }
              const f = kind === HERMES.name ? HERMES : NEMOTRON;
              const { calls, content } = parseToolCalls(f, FUNCTIONS.map((t) => t.name), summary.text);
              assert.equal(content, "", name);
              assert.equal(calls.length, 1, `${name}: ${summary.text}`);
              const fn = FUNCTIONS.find((t) => t.name === calls[0].name)!;
              assert.ok(
                ajv.validate(fn.parameters, JSON.parse(calls[0].arguments)),
                `${name}: ${summary.text}`,
              );
            }
          } finally {
            await instance.release();
          }
        }
      }
    }
  },
});
