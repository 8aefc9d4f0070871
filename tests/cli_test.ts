import assert from "node:assert/strict";
import { join } from "node:path";
import { TextTokenizer } from "../src/model/tokenizer.ts";
import { EVAL_TEXT, golden, relL2, ROOT, TINY_LLAMA } from "./helpers.ts";

async function cli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", join(ROOT, "main.ts"), ...args],
    stdout: "piped",
    stderr: "piped",
  })
    .output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

const BROKEN_TEMPLATE = await Deno.makeTempFile({ suffix: ".jinja" });
await Deno.writeTextFile(BROKEN_TEMPLATE, "{% for m in messages %}{{ m.content }}");
globalThis.addEventListener("unload", () => Deno.removeSync(BROKEN_TEMPLATE));

/** Each command line exits 2 with a message matching its pattern, and no stack trace. */
async function expectExit2(cases: [string[], RegExp][]): Promise<void> {
  for (const [args, re] of cases) {
    const r = await cli(args);
    assert.equal(r.code, 2, `${args.join(" ")}: exit ${r.code} ${r.stderr}`);
    assert.match(r.stderr, re, args.join(" "));
    assert.doesNotMatch(r.stderr, /^\s+at /m, `${args.join(" ")} printed a stack trace`);
  }
}

Deno.test("cli logits: JSON with input_ids and last_logits matching golden (tiny-llama, wasm)", async () => {
  const c = (await golden(TINY_LLAMA)).cases[0];
  const r = await cli(["logits", "--model", TINY_LLAMA, "--prompt", c.prompt, "--device", "wasm"]);
  assert.equal(r.code, 0, r.stderr);
  const out = JSON.parse(r.stdout);
  assert.deepEqual(out.input_ids, c.input_ids);
  assert.ok(relL2(out.last_logits, c.last_logits) < 1e-3);
  assert.equal(out.plan, "unfused");
});

Deno.test("cli logits --threads 2: onnxruntime's threaded WASM gives the golden logits too", async () => {
  const c = (await golden(TINY_LLAMA)).cases[0];
  const r = await cli([
    "logits",
    "--model",
    TINY_LLAMA,
    "--prompt",
    c.prompt,
    "--device",
    "wasm",
    "--threads",
    "2",
  ]);
  assert.equal(r.code, 0, r.stderr);
  assert.ok(relL2(JSON.parse(r.stdout).last_logits, c.last_logits) < 1e-3);
});

Deno.test("cli generate: streams the greedy continuation of the default model to stdout", async () => {
  const c = (await golden(join(ROOT, "models", "tiny-nas"))).cases[1];
  const r = await cli(["generate", "--prompt", c.prompt, "--max-tokens", "8", "--device", "wasm"]);
  assert.equal(r.code, 0, r.stderr);
  const summary = JSON.parse(r.stderr.trim().split("\n").at(-1)!);
  assert.equal(summary.completion_tokens, 8);
  const tok = await TextTokenizer.load(join(ROOT, "models", "tiny-nas"));
  assert.equal(r.stdout, tok.decode(c.greedy_ids.slice(0, 8)) + "\n");
});

Deno.test("cli: bad input exits 2 with a message, never a stack trace", async () => {
  const dir = await Deno.makeTempDir();
  await Deno.writeTextFile(join(dir, "plan.json"), JSON.stringify({ ffn_groups: [[1, 2]] }));
  await Deno.writeTextFile(join(dir, "broken.json"), "{");
  const cases: [string[], RegExp][] = [
    [["frobnicate"], /unknown command "frobnicate"/],
    [
      ["logits", "--prompt", "x", "--model", "/no/such/model"],
      /model directory \/no\/such\/model does not exist/,
    ],
    [["logits", "--prompt", "x", "--model", dir], /config.json/],
    [["logits"], /--prompt/],
    [
      ["logits", "--prompt", "x", "--plan", join(dir, "plan.json"), "--device", "wasm"],
      /ffn_groups\[0\] \[1,2\]: layer 2 has attention/,
    ],
    [["logits", "--prompt", "x", "--plan", join(dir, "broken.json"), "--device", "wasm"], /cannot read plan/],
    [["logits", "--prompt", "x", "--device", "tpu"], /--device/],
    [["logits", "--prompt", "x", "--port", "1"], /Unknown option '--port'/],
    [["serve", "--admin-token", "has space!"], /--admin-token: may use letters/],
    [
      ["analyze", "--text", "data/eval.py.txt", "--window", "4096"],
      /--window: 4096 exceeds the model's context/,
    ],
    [["bench", "--preset", "llama-8b", "--device", "wasm"], /do not fit WASM's 4.3 GB heap/],
    [["bench", "--frontier"], /--frontier: only POST \/bench has an analysis/],
    [["generate", "--prompt", "x", "--max-tokens", "0"], /--max-tokens: .*>=1/],
    [["generate", "--prompt", "x", "--temperature", "hot"], /--temperature/],
    [["serve", "--port", "70000"], /--port/],
    [["serve", "--chat-template", "/nonexistent.jinja"], /--chat-template: cannot read \/nonexistent.jinja/],
    [["serve", "--chat-template", BROKEN_TEMPLATE], /--chat-template: the chat template .* does not parse/],
    [["serve", "--max-active", "0"], /--max-active/],
    [["serve", "--max-queue", "-1"], /--max-queue/],
    [["serve", "--request-timeout", "0"], /--request-timeout/],
    [["serve", "--header-timeout", "0"], /--header-timeout/],
    [["serve", "--header-timeout", "soon"], /--header-timeout/],
    [["serve", "--max-client-connections", "0"], /--max-client-connections/],
    [["serve", "--max-tokens-cap", "99999"], /--max-tokens-cap/],
    [["serve", "--admin-token", "short"], /--admin-token: must be at least 8 characters/],
  ];
  await expectExit2(cases);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("cli analyze: matrix, ratios, runs and a valid suggested plan; heatmap written", async () => {
  const dir = await Deno.makeTempDir();
  const svg = join(dir, "heat.svg");
  const r = await cli(["analyze", "--text", EVAL_TEXT, "--max-tokens", "48", "--window", "24", "--svg", svg]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /analyze: forward passes: 38\/38 \(100%/);
  const report = JSON.parse(r.stdout);
  assert.equal(report.analysis.matrix.length, 18);
  assert.equal(report.analysis.ratios.length, 18);
  assert.equal(report.analysis.tokens, 48);
  assert.deepEqual(report.runs, [[2, 3, 4, 5, 6, 7, 8]]);
  assert.ok(report.trials.length >= 1 && report.trials.every((t: { loss: number }) => t.loss > 0));
  assert.ok(report.suggested_plan.ffn_groups.length >= 1);
  assert.match(await Deno.readTextFile(svg), /^<svg/);
  const planFile = join(dir, "plan.json");
  await Deno.writeTextFile(planFile, JSON.stringify(report.suggested_plan));
  const evalArgs = [
    "eval",
    "--text",
    EVAL_TEXT,
    "--max-tokens",
    "128",
    "--skip-tokens",
    "48",
    "--device",
    "wasm",
  ];
  const e = await cli([...evalArgs, "--plan", planFile]);
  assert.equal(e.code, 0, e.stderr);
  const q = JSON.parse(e.stdout);
  assert.equal(q.tokens, 127);
  assert.ok(q.kl > 0 && q.kl < 1, `kl ${q.kl}`);
  assert.ok(q.top1_agreement > 0.5 && q.top1_agreement <= 1);
  assert.ok(Math.abs(q.ppl - Math.exp(q.loss)) < 1e-9);
  const u = JSON.parse(
    (await cli(evalArgs)).stdout,
  );
  assert.equal(u.plan, "unfused");
  assert.equal(u.kl, undefined);
  assert.ok(u.loss > 0.5 && u.loss < 4, `unfused loss ${u.loss}`);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("cli analyze/eval: bad flags exit 2", async () => {
  await expectExit2([
    [["analyze", "--text", "/no/file"], /cannot read text \/no\/file/],
    [["eval", "--text", "/no/file"], /cannot read text \/no\/file/],
    [["analyze", "--text", EVAL_TEXT, "--max-tokens", "1"], /--max-tokens/],
    [["analyze", "--text", EVAL_TEXT, "--threshold", "-1"], /--threshold/],
    [["eval", "--text", EVAL_TEXT, "--skip-tokens", "99999999"], /fewer than 2 tokens/],
  ]);
});

Deno.test("cli: usage and --help come from the commands' schemas, every flag listed", async () => {
  const { main } = await import("../main.ts");
  const { serveCommand } = await import("../src/cli/serve.ts");
  const lines: string[] = [];
  const log = console.log;
  console.log = (s: string) => lines.push(s);
  try {
    assert.equal(await main(["serve", "--help"]), 0);
    assert.equal(await main(["--help"]), 0);
    assert.equal(await main(["generate", "--help"]), 0);
  } finally {
    console.log = log;
  }
  const [serveHelp, all, generateHelp] = lines;
  for (const key of Object.keys(serveCommand.schema.shape)) {
    assert.ok(serveHelp.includes(`--${key.replaceAll("_", "-")}`), `serve --help lists --${key}`);
  }
  // The command list is one line a command; flags are each command's own --help.
  for (const name of ["serve", "generate", "logits", "analyze", "eval", "bench", "export"]) {
    assert.match(all, new RegExp(`^  ${name} +\\S`, "m"));
  }
  assert.ok(all.split("\n").length < 20, all);
  assert.doesNotMatch(all, /--max-tokens/);
  assert.match(generateHelp, /--max-tokens N\]\s+tokens to generate at most \(default 64\)/);
  // A flag no command has points at the command's --help.
  const errors: string[] = [];
  const error = console.error;
  console.error = (s: string) => errors.push(s);
  try {
    assert.equal(await main(["serve", "--bogus"]), 2);
  } finally {
    console.error = error;
  }
  assert.match(errors.join("\n"), /Unknown option '--bogus'\n\(fusedge serve --help lists its flags\)/);
});
