import assert from "node:assert/strict";
import { loadConfig } from "../src/model/checkpoint.ts";
import { estimateMemory } from "../src/ort/memory.ts";
import { resolveGraphOptions } from "../src/ort/ort.ts";
import { moduleUrl, probe, synthCheckpoint } from "./helpers.ts";
import { post, startServer } from "./server_helpers.ts";

/**
 * The full-depth Llama-3.2-1B-shaped checkpoint: 16 layers, 2.47 GB of bf16 in two shards, over the
 * 2 GiB protobuf cap. It runs alone after the parallel suite (`deno task test-serial`): a server
 * holding it takes about 10 GB. CI runs the bounded form (load, then a two-token completion per
 * format); FUSEDGE_SCALE=full generates 16. A plain Llama has no attention-free run to fuse: swaps
 * at this size are measured by `bench --formats` on the Nemotron-NAS shaped checkpoint.
 */
const FULL = Deno.env.get("FUSEDGE_SCALE") === "full";

Deno.test({
  name:
    "scale: the full 1B-shaped checkpoint is refused in fp32 on WASM up front and served in int4 and int8",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async (t) => {
    const dir = await Deno.makeTempDir({ prefix: "fusedge-1b-" });
    try {
      const made = await synthCheckpoint(dir, "llama-3.2-1b");
      assert.ok(made.bytes > 2 ** 31, "over the protobuf cap");

      await t.step(
        "fp32 on WASM: exit 2 naming the sizes and options, before any weight is read",
        async () => {
          const { value: { code, peak }, stderr } = await probe<{ code: number; peak: number }>(`
            import { main } from "${moduleUrl("main.ts")}";
            const code = await main(["generate", "--model", ${
            JSON.stringify(dir)
          }, "--device", "wasm", "--prompt", "x"]);
            console.log(JSON.stringify({ code, peak: status("VmHWM") }));
          `);
          assert.equal(code, 2);
          assert.match(
            stderr,
            /--model: the model needs 6\.0\d GB of fp32 weights and \d+\.\d\d GB of KV cache/,
          );
          assert.match(stderr, /more than WASM's 4\.03 GB heap; options that fit: .*--device webgpu/);
          assert.ok(peak < 400e6, `peak RSS ${(peak / 1e6).toFixed(0)} MB: no weights were read`);
        },
      );

      for (const quantize of ["int4", "int8"] as const) {
        await t.step(`${quantize} on WASM: loads, reports its format and serves a completion`, async () => {
          const server = await startServer([
            "--model",
            dir,
            "--device",
            "wasm",
            "--quantize",
            quantize,
            "--max-context",
            "2048",
            "--max-active",
            "2",
          ]);
          try {
            await server.ready;
            const health = await (await fetch(`${server.base}/health`)).json();
            assert.equal(health.dtype, "fp32");
            assert.equal(health.quantize, quantize);
            const cfg = await loadConfig(dir, { maxContext: 2048 });
            const est = estimateMemory(cfg, await resolveGraphOptions("fp32", quantize, "wasm")).weightBytes;
            assert.ok(Math.abs(health.weight_bytes - est) / est < 0.01, `${health.weight_bytes} vs ${est}`);
            const tokens = FULL ? 16 : 2;
            const res = await post(server.base, "/v1/completions", {
              prompt: "def main(args):\n",
              max_tokens: tokens,
              temperature: 0,
            });
            assert.equal(res.status, 200, await res.clone().text());
            const body = await res.json();
            assert.equal(body.usage.completion_tokens, tokens);
          } finally {
            await server.stop();
          }
        });
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
