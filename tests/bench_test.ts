import assert from "node:assert/strict";
import { join } from "node:path";
import { benchFfn } from "../src/bench/ffn_bench.ts";
import { checkpointRun, presetRun } from "../src/bench/shapes.ts";
import { loadCheckpoint } from "../src/model/checkpoint.ts";
import type { Spread } from "../src/numeric.ts";
import { requestGpu } from "../src/webgpu/device.ts";
import {
  assertSpread,
  HAS_WEBGPU,
  NAS_LIKE,
  ROOT,
  runScript,
  TINY_NAS,
  writeRandomModel,
} from "./helpers.ts";

const gpuTest = (name: string, fn: () => Promise<void>) =>
  Deno.test({ name, ignore: !HAS_WEBGPU, sanitizeResources: false, sanitizeOps: false, fn });

gpuTest(
  "WGSL FFN kernels: sequential and fused runs match float64 (gemv and tiled gemm, ragged widths)",
  async () => {
    const gpu = await requestGpu();
    const dir = await writeRandomModel(NAS_LIKE);
    const ragged = checkpointRun(await loadCheckpoint(dir), 3); // widths 64, 48, 32: fused n = 144
    assert.deepEqual(ragged.layers, [2, 3, 4]);
    const r = await benchFfn(gpu, ragged, { tokens: [1, 19], weightType: "f32", tolerance: 1e-5 });
    assert.deepEqual(r.n_per_layer, [64, 48, 32]);
    for (const c of r.cases) {
      assert.ok(c.sequential_rel_err < 1e-5 && c.fused_rel_err < 1e-5, JSON.stringify(c));
      assert.ok(c.sequential_ms > 0 && c.fused_ms > 0 && c.fused_gbps > 0);
    }
    assert.ok(r.streaming_read_gbps > 0);
    if (gpu.hasF16) {
      const h = await benchFfn(gpu, checkpointRun(await loadCheckpoint(TINY_NAS), 2), {
        tokens: [1],
        weightType: "f16",
        tolerance: 2e-3,
      });
      assert.ok(h.cases[0].fused_rel_err < 2e-3);
    }
    gpu.device.destroy();
    await Deno.remove(dir, { recursive: true });
  },
);

gpuTest("WGSL FFN kernels: a wrong result fails the check instead of being timed", async () => {
  const gpu = await requestGpu();
  await assert.rejects(
    benchFfn(gpu, presetRun("tiny-nas", 2), { tokens: [1], weightType: "f32", tolerance: 1e-12 }),
    /sequential FFN run, T=1: relative error .* vs float64/,
  );
  gpu.device.destroy();
});

/** Each set of flags makes a study exit 2 with a message naming its first flag. */
async function assertRefused(
  run: (...args: string[]) => Promise<{ code: number; stderr: string }>,
  bads: string[][],
): Promise<void> {
  for (const bad of bads) {
    const b = await run(...bad);
    assert.equal(b.code, 2, `${bad.join(" ")}: ${b.stderr}`);
    assert.match(b.stderr, new RegExp(bad[0]));
  }
}

async function bench(args: string[]) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", join(ROOT, "main.ts"), "bench", ...args],
    stdout: "piped",
    stderr: "piped",
  })
    .output();
  return {
    code: out.code,
    stdout: new TextDecoder().decode(out.stdout),
    stderr: new TextDecoder().decode(out.stderr),
  };
}

gpuTest("cli bench on WebGPU: kernels, onnxruntime graphs and decode, as JSON and as a table", async () => {
  const r = await bench([
    "--model",
    TINY_NAS,
    "--device",
    "webgpu",
    "--k",
    "2",
    "--tokens",
    "1,4",
    "--decode-tokens",
    "4",
    "--rounds",
    "3",
    "--batch",
    "1,2",
    "--json",
  ]);
  assert.equal(r.code, 0, r.stderr);
  const report = JSON.parse(r.stdout);
  assert.equal(report.device, "webgpu");
  // Where the step goes: the captured step creates no bind group and reads nothing back.
  assert.deepEqual(
    report.steps.map((p: { plan: string; batch: number }) => `${p.plan} ${p.batch}`),
    ["unfused 1", "unfused 2", "ffn[7-8] 1", "ffn[7-8] 2"],
  );
  for (const p of report.steps) {
    assert.ok(p.nodes > 50 && p.dispatches > 50 && p.submits >= 1, JSON.stringify(p));
    assert.equal(p.readbacks, 0);
    assert.equal(p.bind_groups, 0);
    assert.ok(p.host_ms.median > 0 && p.gpu_ms.median > 0, JSON.stringify(p));
  }
  assert.ok(report.steps[2].nodes < report.steps[0].nodes, "fusing 7..8 removes nodes");
  assert.equal(report.source, "tiny-nas layers 7..8");
  assert.deepEqual(report.ffn_kernels.cases.map((c: { tokens: number }) => c.tokens), [1, 4]);
  assert.deepEqual(report.ffn_onnx.cases[0].matmuls, { sequential: 6, fused: 3 });
  assert.equal(report.dtype, "fp16", "auto: fp16 on an adapter with shader-f16");
  assert.ok(report.ffn_onnx.graph_mb > 1.5 && report.ffn_onnx.session_create_ms.fused > 0);
  const decode = report.decode.map((d: { device: string; plan: string; sampling: string }) =>
    `${d.device} ${d.plan} ${d.sampling}`
  );
  assert.deepEqual(decode, [
    "webgpu unfused gpu",
    "webgpu ffn[7-8] gpu",
    "wasm unfused host",
    "wasm ffn[7-8] host",
  ]);
  const table = await bench(["--preset", "tiny-nas", "--device", "webgpu", "--k", "2", "--tokens", "1"]);
  assert.equal(table.code, 0, table.stderr);
  assert.match(table.stdout, /WGSL FFN kernels/);
  assert.match(table.stdout, /fused\/seq/);
});

Deno.test("cli bench on WASM and bad bench flags", async () => {
  const r = await bench(["--preset", "tiny-nas", "--device", "wasm", "--k", "3", "--tokens", "1", "--json"]);
  assert.equal(r.code, 0, r.stderr);
  const report = JSON.parse(r.stdout);
  assert.equal(report.ffn_kernels, null);
  assert.equal(report.ffn_onnx.cases[0].matmuls.sequential, 9);
  const c = report.ffn_onnx.cases[0];
  assert.equal(c.rounds, 5);
  assert.ok(c.sequential_range_ms[0] <= c.sequential_ms && c.sequential_ms <= c.sequential_range_ms[1]);
  for (
    const [args, re] of [
      [["--preset", "gpt-5"], /--preset/],
      [["--tokens", "1,x"], /--tokens/],
      [["--tokens", "0"], /--tokens/],
      [["--k", "1"], /--k/],
      [["--model", TINY_NAS, "--preset", "tiny-nas"], /exclusive/],
    ] as [string[], RegExp][]
  ) {
    const bad = await bench(args);
    assert.equal(bad.code, 2, `${args}: ${bad.stderr}`);
    assert.match(bad.stderr, re);
  }
});

Deno.test("cli bench decode: warm sessions in alternating rounds, median with range, native onnxruntime beside WASM", async () => {
  const args = ["--model", TINY_NAS, "--device", "wasm", "--k", "2", "--tokens", "1", "--decode-tokens", "8"];
  const r = await bench([...args, "--rounds", "3", "--native", "--json"]);
  assert.equal(r.code, 0, r.stderr);
  const report = JSON.parse(r.stdout);
  const rows = report.decode.map((d: { device: string; plan: string }) => `${d.device} ${d.plan}`);
  assert.deepEqual(rows, ["wasm unfused", "wasm ffn[7-8]", "cpu unfused", "cpu ffn[7-8]"]);
  for (const d of report.decode) {
    assert.equal(d.rounds, 3);
    for (const s of [d.tokens_per_second, d.prefill_ms, d.tokens_per_cpu_second]) {
      assertSpread(s, d);
    }
  }
  assert.equal(report.decode[0].speedup, 1);
  assert.equal(report.decode[2].speedup, 1);
  const table = await bench([...args, "--rounds", "3", "--native"]);
  assert.equal(table.code, 0, table.stderr);
  assert.match(table.stdout, /cpu\/wasm unfused: decode \d+\.\d+x, prefill \d+\.\d+x/);
  // --skip-wasm: the device's own rows alone (a 1B model's WASM rounds take minutes on a GPU machine).
  const alone = await bench([...args.with(3, "cpu"), "--rounds", "3", "--skip-wasm", "--json"]);
  assert.equal(alone.code, 0, alone.stderr);
  assert.deepEqual(
    JSON.parse(alone.stdout).decode.map((d: { device: string; plan: string }) => `${d.device} ${d.plan}`),
    ["cpu unfused", "cpu ffn[7-8]"],
  );
});

Deno.test("cli bench --formats: each format served end to end in workers, the fused plan built as a swap", async () => {
  const args = ["--model", TINY_NAS, "--device", "wasm", "--k", "3", "--tokens", "1", "--decode-tokens", "4"];
  const formats = ["--formats", "fp32", "--formats", "fp32+int4", "--formats", "fp16"];
  const r = await bench([...args, "--rounds", "3", ...formats, "--json"]);
  assert.equal(r.code, 0, r.stderr);
  const report = JSON.parse(r.stdout);
  assert.ok(report.load.ms > 0 && report.load.peak_rss_mb > 0);
  const sv = report.serving;
  assert.equal(sv.fused_plan, "ffn[6-8]");
  assert.deepEqual(sv.cases.map((c: { format: string }) => c.format), ["fp32", "fp32+int4"]);
  assert.deepEqual(sv.skipped.map((s: { format: string }) => s.format), ["fp16"], "fp16 needs WebGPU");
  for (const c of sv.cases) {
    assert.ok(c.build_ms >= c.session_create_ms && c.session_create_ms > 0);
    assert.ok(c.peak_rss_mb > 0);
    assert.deepEqual(c.decode.map((d: { plan: string }) => d.plan), ["unfused", "ffn[6-8]"]);
    for (const d of c.decode) {
      assert.ok(d.tokens_per_second.min > 0 && d.tokens_per_second.min <= d.tokens_per_second.median);
    }
  }
  // The swap converts only the fused group: 3 fp32 matrices of 2304 x 256 and a unit gain.
  assert.equal(sv.cases[0].swap.rebuilt_mb, (3 * 2304 * 256 * 4 + 256 * 4) / 1e6);
  const table = await bench([...args, "--rounds", "3", "--formats", "fp32+int8"]);
  assert.equal(table.code, 0, table.stderr);
  assert.match(table.stdout, /served end to end on wasm[\s\S]*fp32\+int8 .* unfused/);
  const bad = await bench(["--formats", "int3"]);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--formats/);
});

Deno.test("cli bench --batch: tokens/s at each batch size, unfused against the fused plan, in alternating rounds", async () => {
  const args = ["--model", TINY_NAS, "--device", "wasm", "--k", "2", "--tokens", "1", "--decode-tokens", "4"];
  const r = await bench([...args, "--rounds", "3", "--batch", "1,8", "--json"]);
  assert.equal(r.code, 0, r.stderr);
  const cases = JSON.parse(r.stdout).batched;
  assert.deepEqual(
    cases.map((c: { plan: string; batch: number }) => `${c.plan} ${c.batch}`),
    ["unfused 1", "unfused 8", "ffn[7-8] 1", "ffn[7-8] 8"],
  );
  for (const c of cases) {
    for (const s of [c.tokens_per_second, c.ms_per_step, c.tokens_per_cpu_second]) {
      assertSpread(s, c);
    }
  }
  assert.equal(cases[0].speedup, 1);
  assert.equal(cases[1].speedup, 1, "each batch size against the unfused model at the same size");
  const steps = JSON.parse(r.stdout).steps;
  assert.equal(steps.length, 4);
  for (const p of steps) {
    assert.ok(p.nodes > 50 && p.host_ms.median > 0, JSON.stringify(p));
    assert.equal(p.dispatches, null, "WASM dispatches no GPU work");
  }
  const table = await bench([...args, "--rounds", "3", "--batch", "1"]);
  assert.equal(table.code, 0, table.stderr);
  assert.match(table.stdout, /where a decode step goes/);
  assert.match(
    table.stdout,
    /fused\/unfused at batch 1 \(ffn\[7-8\]\): measured \d+\.\d+x, predicted \d+\.\d+x/,
  );
  const bad = await bench([...args, "--batch", "0"]);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--batch/);
  // --constrained: each case also under a grammar, against the unconstrained one at the same size.
  const c = await bench([...args, "--rounds", "3", "--batch", "1,4", "--constrained"]);
  assert.equal(c.code, 0, c.stderr);
  const rows = c.stdout.split("\n").filter((l) => /^wasm\s+unfused\s+\d+\s+(no|yes)\s/.test(l));
  assert.deepEqual(rows.map((l) => l.split(/\s+/).slice(2, 4).join(" ")), ["1 no", "1 yes", "4 no", "4 yes"]);
});

Deno.test("bench/studies/step_parts.ts: a batched step's parts timed in alternating rounds; bad flags exit 2", async () => {
  const run = (...args: string[]) => runScript("bench/studies/step_parts.ts", ...args);
  const r = await run("--batch", "1,4", "--steps", "2", "--rounds", "2", "--prefix", "8", "--json");
  assert.equal(r.code, 0, r.stderr);
  const rows = JSON.parse(r.stdout).rows as {
    part: string;
    batch: number;
    ms_per_step: Spread;
    over_first: number;
  }[];
  assert.deepEqual(
    rows.map((x) => `${x.part} ${x.batch}`),
    [
      "whole 1",
      "whole 4",
      "no-attention 1",
      "no-attention 4",
      "no-ffn 1",
      "no-ffn 4",
      "lm-head 1",
      "lm-head 4",
    ],
  );
  for (const x of rows) {
    assertSpread(x.ms_per_step, x);
  }
  const ms = (part: string, batch: number) =>
    rows.find((x) => x.part === part && x.batch === batch)!.ms_per_step.median;
  assert.ok(ms("lm-head", 4) < ms("whole", 4), "the LM head alone is a part of the whole step");
  assert.equal(rows[0].over_first, 1);
  await assertRefused(run, [
    ["--batch", "0"],
    ["--parts", "whole,mlp"],
    ["--steps", "x"],
    ["--model", "/nonexistent"],
    ["--bogus"],
  ]);
});

Deno.test(
  "bench/studies/attention_forms.ts: fused and MatMul attention on WASM (int8 weights), decode and prefill, alternated; bad flags exit 2",
  async () => {
    const run = (...args: string[]) => runScript("bench/studies/attention_forms.ts", ...args);
    const r = await run(
      "--batch",
      "1,3",
      "--lengths",
      "8,40",
      "--chunk",
      "16",
      "--steps",
      "2",
      "--rounds",
      "2",
      "--quantize",
      "int8",
      "--json",
    );
    assert.equal(r.code, 0, r.stderr);
    const report = JSON.parse(r.stdout);
    assert.equal(report.quantize, "int8");
    const rows = report.rows as {
      form: string;
      kind: string;
      batch: number;
      length: number;
      ms: Spread;
      fused_over_this: number;
    }[];
    assert.deepEqual(
      rows.map((x) => `${x.form} ${x.kind} ${x.batch} ${x.length}`),
      ["fused", "matmul"].flatMap((f) =>
        ["decode 1 8", "decode 1 40", "decode 3 8", "decode 3 40", "prefill 1 8", "prefill 1 40"].map((c) =>
          `${f} ${c}`
        )
      ),
    );
    for (const x of rows) {
      assertSpread(x.ms, x);
      if (x.form === "fused") assert.equal(x.fused_over_this, 1);
    }
    await assertRefused(run, [
      ["--lengths", "-1"],
      ["--lengths", "5000"],
      ["--chunk", "0"],
      ["--device", "gpu"],
      ["--quantize", "int3"],
      ["--bogus"],
    ]);
  },
);

gpuTest(
  "bench/studies/host_step.ts: the baseline's step beside today's in one process; bad flags exit 2",
  async () => {
    const r = await runScript("bench/studies/host_step.ts", "--steps", "2", "--rounds", "2", "--json");
    assert.equal(r.code, 0, r.stderr);
    const report = JSON.parse(r.stdout);
    // The hand-built attention, a bind group per kernel, uniforms written per kernel; then the captured
    // step of fused operators, which makes no bind group.
    assert.ok(report.before.nodes > 2.5 * report.after.nodes, JSON.stringify(report));
    assert.ok(report.before.bind_groups > 100 && report.after.bind_groups === 0, JSON.stringify(report));
    assert.ok(report.before.writes > 100 && report.after.writes <= 4, JSON.stringify(report));
    assert.equal(report.host_ms_ratio.min > 0, true);
    await assertRefused((...args) => runScript("bench/studies/host_step.ts", ...args), [
      ["--sides", "during"],
      ["--steps", "0"],
      ["--baseline", "no-such-rev"],
    ]);
  },
);
