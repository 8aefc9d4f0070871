import assert from "node:assert/strict";
import { join } from "node:path";
import OpenAI from "openai";
import { zodFunction, zodResponseFormat } from "openai/helpers/zod";
import { z } from "zod";
import { golden, ROOT, TINY_NAS } from "./helpers.ts";
import { startServer } from "./server_helpers.ts";

/** log-softmax in float64, the reference every logprob the server reports is held to. */
function logSoftmax(row: number[]): number[] {
  const max = Math.max(...row);
  const lse = max + Math.log(row.reduce((s, x) => s + Math.exp(x - max), 0));
  return row.map((x) => x - lse);
}

const close = (a: number, b: number, what: string) =>
  assert.ok(Math.abs(a - b) <= 1e-3 * Math.max(1, Math.abs(b)), `${what}: ${a} vs ${b}`);

Deno.test({
  name:
    "the official openai client: chat and completions, streamed and not, logprobs, echo, n, include_usage",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn(t) {
    const template = join(ROOT, "tests", "fixtures", "chat", "llama-3.1-8b-instruct.jinja");
    // Two WASM threads in the model worker: the logprobs below hold it to the float64 reference too.
    const server = await startServer([
      "--model",
      TINY_NAS,
      "--device",
      "wasm",
      "--threads",
      "2",
      "--chat-template",
      template,
    ]);
    try {
      await server.ready;
      const client = new OpenAI({ baseURL: `${server.base}/v1`, apiKey: "unused", maxRetries: 0 });
      const model = "tiny-nas";
      const messages = [
        { role: "system" as const, content: "You write Python." },
        { role: "user" as const, content: "A function that adds two numbers." },
      ];

      await t.step("structured outputs: chat.completions.parse with a zod schema", async () => {
        const Person = z.object({ name: z.string().max(10), age: z.number().int().min(0).max(99) });
        const r = await client.chat.completions.parse({
          model,
          messages: [{ role: "user", content: "Make up a person." }],
          response_format: zodResponseFormat(Person, "person"),
          max_tokens: 120,
          temperature: 1,
          seed: 11,
        });
        const parsed = r.choices[0].message.parsed;
        assert.ok(parsed, r.choices[0].message.content ?? "");
        assert.deepEqual(Person.parse(parsed), parsed);
      });

      const Weather = z.object({ city: z.string().max(12), days: z.number().int().min(1).max(7) });
      await t.step("tool calls: parse with zodFunction gives the parsed arguments", async () => {
        const r = await client.chat.completions.parse({
          model,
          messages: [{ role: "user", content: "Weather in Oslo for two days?" }],
          tools: [zodFunction({ name: "get_weather", parameters: Weather })],
          tool_choice: "required",
          parallel_tool_calls: false,
          max_tokens: 120,
          temperature: 1,
          seed: 3,
        });
        const call = r.choices[0].message.tool_calls?.[0];
        assert.equal(r.choices[0].finish_reason, "tool_calls");
        assert.ok(call?.type === "function", JSON.stringify(r.choices[0].message));
        assert.equal(call.function.name, "get_weather");
        assert.deepEqual(Weather.parse(call.function.parsed_arguments), call.function.parsed_arguments);
      });

      await t.step(
        "tool calls: runTools calls the function with valid arguments, whole and streamed",
        async () => {
          for (const stream of [false, true]) {
            const seen: z.infer<typeof Weather>[] = [];
            const body = {
              model,
              messages: [{ role: "user" as const, content: "Weather in Oslo?" }],
              tools: [zodFunction({
                name: "get_weather",
                parameters: Weather,
                function: (args: z.infer<typeof Weather>) => {
                  seen.push(args);
                  return { temp: 4 };
                },
              })],
              tool_choice: { type: "function" as const, function: { name: "get_weather" } },
              max_tokens: 120,
              temperature: 1,
              seed: 8,
            };
            const runner = stream
              ? client.chat.completions.runTools({ ...body, stream: true })
              : client.chat.completions.runTools(body);
            await runner.done();
            assert.equal(seen.length, 1, `stream: ${stream}`);
            assert.deepEqual(Weather.parse(seen[0]), seen[0]);
            // The runner sent the result back as a tool message: the conversation holds call and result.
            const roles = runner.messages.map((m) => m.role);
            assert.deepEqual(roles.slice(-2), ["assistant", "tool"]);
          }
        },
      );

      await t.step("chat: whole and streamed answers agree; the first chunk carries the role", async () => {
        const whole = await client.chat.completions.create({
          model,
          messages,
          max_tokens: 12,
          temperature: 0,
          logprobs: true,
          top_logprobs: 3,
        });
        assert.equal(whole.object, "chat.completion");
        const choice = whole.choices[0];
        assert.equal(choice.message.role, "assistant");
        assert.equal(typeof choice.message.content, "string");
        assert.ok(["stop", "length"].includes(choice.finish_reason));
        const lps = choice.logprobs!.content!;
        assert.equal(lps.length, whole.usage!.completion_tokens);
        assert.equal(lps.map((l) => l.token).join(""), choice.message.content);
        for (const l of lps) {
          assert.equal(l.top_logprobs.length, 3);
          assert.equal(l.top_logprobs[0].logprob, l.logprob, "greedy takes the likeliest token");
          assert.deepEqual(l.bytes, [...new TextEncoder().encode(l.token)]);
        }

        const stream = await client.chat.completions.create({
          model,
          messages,
          max_tokens: 12,
          temperature: 0,
          stream: true,
          stream_options: { include_usage: true },
        });
        const chunks = [];
        for await (const chunk of stream) chunks.push(chunk);
        assert.ok(chunks.every((c) => c.object === "chat.completion.chunk"));
        assert.equal(chunks[0].choices[0].delta.role, "assistant");
        const text = chunks.flatMap((c) => c.choices.map((x) => x.delta.content ?? "")).join("");
        assert.equal(text, choice.message.content);
        const last = chunks.at(-1)!;
        assert.equal(last.choices.length, 0);
        assert.equal(last.usage!.completion_tokens, whole.usage!.completion_tokens);
        assert.equal(last.usage!.prompt_tokens, whole.usage!.prompt_tokens);
      });

      await t.step("chat: n = 3 seeded choices, each as a lone request with seed + i", async () => {
        const three = await client.chat.completions.create({ model, messages, max_tokens: 6, n: 3, seed: 7 });
        assert.deepEqual(three.choices.map((c) => c.index), [0, 1, 2]);
        const alone = await client.chat.completions.create({ model, messages, max_tokens: 6, seed: 9 });
        assert.equal(three.choices[2].message.content, alone.choices[0].message.content);
      });

      await t.step(
        "completions: logprobs with echo match the float64 reference on the golden prompts",
        async () => {
          for (const c of (await golden(TINY_NAS)).cases) {
            const r = await client.completions.create({
              model,
              prompt: c.input_ids,
              max_tokens: 1,
              temperature: 0,
              logprobs: 5,
              echo: true,
            });
            const lp = r.choices[0].logprobs!;
            const n = c.input_ids.length;
            assert.equal(lp.tokens!.length, n + 1);
            assert.equal(lp.token_logprobs![0], null);
            assert.equal(lp.top_logprobs![0], null);
            // first_logits are the logits at position 0: they score the prompt's second token.
            close(lp.token_logprobs![1]!, logSoftmax(c.first_logits)[c.input_ids[1]], `${c.prompt} token 1`);
            const last = logSoftmax(c.last_logits);
            close(lp.token_logprobs![n]!, last[c.greedy_ids[0]], `${c.prompt} first generated token`);
            const top = Object.values(lp.top_logprobs![n]!).sort((a, b) => b - a);
            const ref = [...last].sort((a, b) => b - a).slice(0, 5);
            top.forEach((v, i) => close(v, ref[i], `${c.prompt} alternative ${i}`));
            assert.ok(r.choices[0].text.startsWith(lp.tokens!.slice(0, n).join("")));
            assert.deepEqual(lp.text_offset!.slice(0, 3), [
              0,
              lp.tokens![0].length,
              lp.tokens![0].length + lp.tokens![1].length,
            ]);
          }
        },
      );

      await t.step("completions: streamed with logprobs, n = 3 and include_usage", async () => {
        const stream = await client.completions.create({
          model,
          prompt: "def add(a, b):",
          max_tokens: 5,
          n: 3,
          seed: 3,
          logprobs: 2,
          stream: true,
          stream_options: { include_usage: true },
        });
        const texts = ["", "", ""];
        let tokens = 0;
        let usage: OpenAI.CompletionUsage | undefined;
        for await (const chunk of stream) {
          for (const ch of chunk.choices) {
            texts[ch.index] += ch.text;
            tokens += ch.logprobs?.tokens?.length ?? 0;
          }
          if (chunk.usage && !chunk.choices.length) usage = chunk.usage;
        }
        assert.ok(usage, "the include_usage chunk");
        assert.equal(tokens, usage!.completion_tokens);
        const whole = await client.completions.create({
          model,
          prompt: "def add(a, b):",
          max_tokens: 5,
          n: 3,
          seed: 3,
        });
        assert.deepEqual(whole.choices.map((c) => c.text), texts);
      });

      await t.step("POST /tokenize with messages counts what a chat completion's prompt is", async () => {
        const tokenize = (body: unknown) =>
          fetch(`${server.base}/tokenize`, {
            method: "POST",
            headers: { "content-type": "application/json" },
            body: JSON.stringify(body),
          });
        const counted = await (await tokenize({ messages })).json();
        const chat = await client.chat.completions.create({ model, messages, max_tokens: 1 });
        assert.equal(counted.count, chat.usage!.prompt_tokens);
        const bare = await (await tokenize({ messages, add_generation_prompt: false })).json();
        assert.ok(bare.count < counted.count, "the generation prompt is tokens of its own");
        const both = await tokenize({ messages, prompt: "x" });
        assert.equal(both.status, 400);
        assert.match((await both.json()).error.message, /prompt or messages, not both/);
      });

      await t.step("bad values are a 400 the client raises with the field named", async () => {
        await assert.rejects(
          client.chat.completions.create({ model, messages, top_logprobs: 30, logprobs: true }),
          (e) =>
            e instanceof OpenAI.BadRequestError && (e.error as { param?: string }).param === "top_logprobs",
        );
        await assert.rejects(
          client.chat.completions.create({
            model,
            messages: [{ role: "user", content: "hi" }],
            tools: [{ type: "function", function: { name: "f" } }],
            tool_choice: { type: "function", function: { name: "g" } },
          }),
          (e) =>
            e instanceof OpenAI.BadRequestError && (e.error as { param?: string }).param === "tool_choice" &&
            /names no function in tools/.test(e.message),
        );
      });
    } finally {
      await server.stop();
    }
  },
});
