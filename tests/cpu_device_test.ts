import assert from "node:assert/strict";
import { join } from "node:path";
import { FLOAT_WEIGHTS } from "../src/onnx/format.ts";
import { FP32_INT4, planFormsMatchWasm } from "./engine_helpers.ts";
import { HAS_NATIVE, ROOT } from "./helpers.ts";
import { post, readSse, startServer } from "./server_helpers.ts";

const nativeTest = (name: string, fn: () => Promise<void>) =>
  Deno.test({ name, ignore: !HAS_NATIVE, sanitizeResources: false, sanitizeOps: false, fn });

nativeTest(
  "--device cpu: every plan form on native onnxruntime as on WASM (logits 1e-3, greedy ids)",
  async () => {
    await planFormsMatchWasm("cpu", [FLOAT_WEIGHTS, FP32_INT4]);
  },
);

nativeTest(
  "--device cpu over HTTP: batched streams, prefix reuse, a hot swap and the KV budget on native onnxruntime",
  async () => {
    const server = await startServer(["--device", "cpu", "--threads", "2", "--kv-cache-mb", "1"]);
    await server.ready;
    try {
      const health = await (await fetch(`${server.base}/health`)).json();
      assert.equal(health.status, "ok");
      const models = await (await fetch(`${server.base}/v1/models`)).json();
      assert.equal(models.data[0].device, "cpu");
      // A stream beside three other requests: its tokens keep coming, the serving thread never stalls.
      const others = [1, 2, 3].map((seed) =>
        post(server.base, "/v1/completions", { prompt: "def main(", max_tokens: 40, temperature: 1, seed })
      );
      const res = await post(server.base, "/v1/completions", {
        prompt: "import os\n",
        max_tokens: 40,
        stream: true,
      });
      const streamed = await readSse(res);
      assert.ok(streamed.done);
      const gaps = streamed.arrivals.slice(1).map((t, i) => t - streamed.arrivals[i]);
      assert.ok(Math.max(...gaps) < 2000, `largest gap between events ${Math.max(...gaps).toFixed(0)} ms`);
      for (const o of await Promise.all(others)) assert.equal(o.status, 200);
      // The same prompt again: its prefix comes from a kept cache.
      const prompt = "class Parser:\n    def __init__(self, text):\n        self.text = text\n";
      await post(server.base, "/v1/completions", { prompt, max_tokens: 4, temperature: 0 });
      const again =
        await (await post(server.base, "/v1/completions", { prompt, max_tokens: 4, temperature: 0 }))
          .json();
      assert.ok(again.usage.prompt_tokens_details.cached_tokens > 0, JSON.stringify(again.usage));
      // A hot swap builds the fused plan in its worker on native onnxruntime and serves it.
      const swap = await post(server.base, "/fuse", { ffn_groups: [[3, 4, 5], [6, 7, 8]] });
      assert.equal(swap.status, 200, await swap.clone().text());
      const fused = await post(server.base, "/v1/completions", { prompt: "x = ", max_tokens: 4 });
      assert.equal(fused.headers.get("x-fusedge-plan"), "ffn[3-5,6-8]");
      // tiny-nas: 6144 bytes of KV a token in fp32, so 1 MB is 170 tokens: 300 can never fit.
      const big = await post(server.base, "/v1/completions", { prompt: "def main(", max_tokens: 300 });
      assert.equal(big.status, 400);
      assert.match((await big.json()).error.message, /more than the whole budget of 1\.0 MB/);
    } finally {
      await server.stop();
    }
  },
);

Deno.test("--device cpu where native onnxruntime cannot load: exit 2, the reason and the other devices named", async () => {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", join(ROOT, "main.ts"), "generate", "--device", "cpu", "--prompt", "x"],
    env: { FUSEDGE_ONNXRUNTIME_NODE: "file:///nonexistent/onnxruntime-node.mjs" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(out.code, 2);
  assert.match(
    new TextDecoder().decode(out.stderr),
    /--device cpu: native onnxruntime \(onnxruntime-node\) does not load here: .*; use --device wasm or --device webgpu/,
  );
});
