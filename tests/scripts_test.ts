import assert from "node:assert/strict";
import { assertSpread, ROOT, runScript } from "./helpers.ts";

Deno.test("measurement scripts: an unknown flag or a bad value exits 2 naming it, never a stack trace", async () => {
  const cases: [string, string[], RegExp][] = [
    ["loadtest.ts", ["--bogus"], /Unknown option '--bogus'/],
    ["loadtest.ts", ["--requests", "0"], /--requests: expected a positive integer, got 0/],
    ["loadtest.ts", ["--swaps", "1.5"], /--swaps: expected a positive integer, got 1.5/],
    ["loadtest.ts", ["--url", "http://example.com"], /only targets loopback addresses/],
    ["bench/studies/frontier.ts", ["--steps"], /Option '--steps <value>' argument missing/],
    ["quality.ts", ["--bogus"], /Unknown option '--bogus'/],
    ["bench/studies/cpu_paths.ts", ["--bogus"], /Unknown option '--bogus'/],
    ["bench/studies/cpu_paths.ts", ["--tokens", "0"], /--tokens: expected a positive integer, got 0/],
    [
      "bench/studies/cpu_paths.ts",
      ["--temperature", "hot"],
      /--temperature: expected a number >= 0, got hot/,
    ],
    ["bench/studies/cpu_paths.ts", ["--paths", "gpu:fp32"], /--paths: "gpu:fp32" is not device:weights/],
    [
      "bench/studies/cpu_paths.ts",
      ["--glibc-tunables", "glibc.malloc.hugetlb=1;huge pages"],
      /--glibc-tunables: expected settings such as glibc.malloc.hugetlb=0;glibc.malloc.hugetlb=1/,
    ],
    ["synth_checkpoint.ts", ["--bogus"], /Unknown option '--bogus'/],
    ["bench/studies/grammar_cost.ts", ["--rounds", "0"], /--rounds: expected a positive integer, got 0/],
    ["bench/studies/grammar_cost.ts", ["--model", "/nonexistent"], /--model: /],
    ["loadtest.ts", ["--heavy", "x"], /--heavy: expected a positive integer, got x/],
    [
      "bench/studies/split_k.ts",
      ["--variants", "off,lots"],
      /--variants: expected a positive integer, got lots/,
    ],
    ["bench/studies/split_k.ts", ["--dtype", "fp8"], /--dtype: auto, fp32 or fp16, got fp8/],
    ["bench/studies/start_time.ts", ["--device", "webgpu"], /--device: wasm or cpu, got webgpu/],
    ["bench/studies/start_time.ts", ["--quantize", "int2"], /--quantize: none, int8 or int4, got int2/],
    [
      "bench/studies/start_time.ts",
      ["--roots", "/nonexistent"],
      /--roots: \/nonexistent is not a fusedge checkout/,
    ],
    [
      "bench/studies/start_time.ts",
      ["--model", "/nonexistent", "--rounds", "1"],
      /serve exited 2 before it was ready:\nerror: model directory \/nonexistent does not exist/,
    ],
    [
      "synth_checkpoint.ts",
      ["--model", "nemotron-nas-1b", "--out", "/nonexistent", "--layers", "0"],
      /--layers: expected a positive integer/,
    ],
    [
      "synth_checkpoint.ts",
      ["--model", "nemotron-nas-1b", "--out", "/nonexistent", "--shard-mb", "abc"],
      /--shard-mb: expected a positive number/,
    ],
  ];
  for (const [script, args, re] of cases) {
    const r = await runScript(script, ...args);
    assert.equal(r.code, 2, `${script} ${args.join(" ")}: ${r.stderr}`);
    assert.match(r.stderr, re, `${script} ${args.join(" ")}`);
    assert.doesNotMatch(r.stderr, /^\s+at /m, "no stack trace");
  }
});

Deno.test("bench/studies/start_time.ts: a cold serve start in a process of its own, a checkout given twice taken in turn", async () => {
  const r = await runScript(
    "bench/studies/start_time.ts",
    ...["--quantize", "int8", "--roots", `${ROOT},${ROOT}`, "--rounds", "1", "--json"],
  );
  assert.equal(r.code, 0, r.stderr);
  const report = JSON.parse(r.stdout);
  assert.equal(report.rows.length, 2);
  for (const row of report.rows) {
    for (const s of [row.ready_s, row.cpu_s, row.peak_rss_mb]) assertSpread(s);
    // The server holds its runtime and tiny-nas' sessions: more than nothing, far less than a GB.
    assert.ok(row.peak_rss_mb.median > 50 && row.peak_rss_mb.median < 1000, `${row.peak_rss_mb.median} MB`);
  }
});

Deno.test("bench/studies/grammar_cost.ts: the vocabulary's tables, a schema's and three tools' compile, a row's mask, in ms", async () => {
  const r = await runScript("bench/studies/grammar_cost.ts", "--rounds", "2", "--json");
  assert.equal(r.code, 0, r.stderr);
  const report = JSON.parse(r.stdout);
  assert.equal(report.vocab, 4096);
  assert.ok(report.tables_ms > 0);
  for (
    const s of [
      report.schema_compile_ms,
      report.tools_auto_compile_ms,
      report.tools_required_compile_ms,
      report.mask_ms_per_row,
    ]
  ) {
    assertSpread(s);
  }
});
