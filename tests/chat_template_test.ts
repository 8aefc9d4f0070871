import { HERMES, LLAMA3_JSON } from "../src/model/tool_calls.ts";
import assert from "node:assert/strict";
import { join } from "node:path";
import { BadCheckpointError, InputError } from "../src/errors.ts";
import { ChatTemplate, readChatTemplate } from "../src/model/chat_template.ts";
import { TextTokenizer } from "../src/model/tokenizer.ts";
import { RemoteTokenizer } from "../src/serving/remote_tokenizer.ts";
import { ROOT, TINY_NAS } from "./helpers.ts";

const FIXTURES = join(ROOT, "tests", "fixtures", "chat");

interface Case {
  name: string;
  template: string;
  messages: { role: string; content: string }[];
  add_generation_prompt: boolean;
  bos_token: string;
  eos_token: string;
  tools?: unknown[];
}

const fixture = async (name: string) => JSON.parse(await Deno.readTextFile(join(FIXTURES, name)));

Deno.test("chat templates: Llama-3.1 and Nemotron-Super render exactly what the models' tokenizers produce", async () => {
  const cases: Case[] = await fixture("cases.json");
  const expected: { name: string; expected: string }[] = await fixture("expected.json");
  assert.equal(cases.length, expected.length);
  for (const [i, c] of cases.entries()) {
    const source = await Deno.readTextFile(join(FIXTURES, c.template));
    const t = ChatTemplate.compile({
      source,
      origin: c.template,
      specialTokens: { bos_token: c.bos_token, eos_token: c.eos_token },
    });
    const extra = c.tools ? { tools: c.tools } : {};
    assert.equal(t.render(c.messages, c.add_generation_prompt, extra), expected[i].expected, c.name);
    assert.equal(t.endOfTurn(), "<|eot_id|>", c.name);
  }
});

Deno.test("chat templates: read from tokenizer_config.json (string or named list, AddedToken objects), overridden by --chat-template", async () => {
  const dir = await Deno.makeTempDir();
  try {
    assert.equal(await readChatTemplate(dir), null);
    const path = join(dir, "tokenizer_config.json");
    await Deno.writeTextFile(
      path,
      JSON.stringify({
        bos_token: { content: "<s>", special: true },
        eos_token: "</s>",
        chat_template: [
          { name: "tool_use", template: "tools" },
          {
            name: "default",
            template:
              "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}",
          },
        ],
      }),
    );
    const src = (await readChatTemplate(dir))!;
    assert.equal(src.origin, path);
    const t = ChatTemplate.compile(src);
    assert.equal(t.render([{ role: "user", content: "hi" }]), "<s>[user]hi</s>");
    assert.equal(t.endOfTurn(), "</s>");
    const over = (await readChatTemplate(dir, "{{ messages[0].content }}!"))!;
    assert.equal(over.origin, "--chat-template");
    assert.equal(ChatTemplate.compile(over).render([{ role: "user", content: "hi" }]), "hi!");
    assert.equal(ChatTemplate.compile(over).endOfTurn(), null);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("chat templates: a template that does not parse names its origin; one that refuses the messages is bad input", () => {
  const broken = { source: "{% for m in messages %}", specialTokens: {} };
  assert.throws(
    () => ChatTemplate.compile({ ...broken, origin: "--chat-template" }),
    (e) => e instanceof InputError && e.field === "chat_template" && /does not parse/.test(e.message),
  );
  assert.throws(
    () => ChatTemplate.compile({ ...broken, origin: "/m/tokenizer_config.json" }),
    (e) => e instanceof BadCheckpointError && /tokenizer_config.json.*--chat-template/.test(e.message),
  );
  const strict = ChatTemplate.compile({
    source:
      "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok",
    origin: "x",
    specialTokens: {},
  });
  assert.throws(
    () => strict.render([{ role: "assistant", content: "hi" }]),
    (e) => e instanceof InputError && e.field === "messages" && /must start with user/.test(e.message),
  );
});

Deno.test("chat templates: the end-of-turn marker stops as a token when the vocabulary has it, else as a stop string", async () => {
  const llama = await Deno.readTextFile(join(FIXTURES, "llama-3.1-8b-instruct.jinja"));
  const a = await RemoteTokenizer.load(TINY_NAS, { chatTemplate: llama });
  // tiny-nas's vocabulary has no <|eot_id|>: the text is a stop sequence.
  assert.deepEqual(a.chat, {
    origin: "--chat-template",
    endOfTurnIds: [],
    endOfTurnStop: "<|eot_id|>",
    toolFormat: LLAMA3_JSON,
  });
  // The worker renders (no bos_token: tiny-nas has no tokenizer_config.json) and encodes.
  const rendered = ChatTemplate.compile({ source: llama, origin: "x", specialTokens: {} })
    .render([{ role: "user", content: "hi" }]);
  const tok = await TextTokenizer.load(TINY_NAS);
  assert.deepEqual(await a.encodeChat([{ role: "user", content: "hi" }]), tok.encode(rendered));
  await assert.rejects(
    a.encodeChat([
      { role: "user", content: "x" },
      { role: "assistant", content: "y", tool_calls: [1, 2] } as never,
    ]),
    (e) => e instanceof InputError && e.field === "messages" && /single tool-calls/.test(e.message),
  );
  a.close();
  // Its one special token is <|endoftext|> (id 0): a ChatML-like template ending turns with it stops on the id.
  const b = await RemoteTokenizer.load(TINY_NAS, {
    chatTemplate:
      "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|endoftext|>\n{% endfor %}<|assistant|>",
  });
  assert.deepEqual(b.chat, {
    origin: "--chat-template",
    endOfTurnIds: [0],
    endOfTurnStop: null,
    toolFormat: HERMES,
  });
  const none = await RemoteTokenizer.load(TINY_NAS);
  assert.equal(none.chat, null);
  b.close();
  none.close();
});
