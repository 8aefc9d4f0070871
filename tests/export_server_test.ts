import assert from "node:assert/strict";
import { join } from "node:path";
import tar from "tar-stream";
import { parsePlan } from "../src/fusion/plan.ts";
import { buildInstance, loadAssets } from "../src/instance/build.ts";
import { UNFUSED } from "../src/fusion/plan.ts";
import { golden, relL2, TINY_NAS } from "./helpers.ts";
import { post, startServer } from "./server_helpers.ts";

/** Unpacks a tar body into `dir`; returns the entry names. */
async function untar(body: ReadableStream<Uint8Array>, dir: string): Promise<string[]> {
  const extract = tar.extract();
  const names: string[] = [];
  const done = (async () => {
    for await (const entry of extract) {
      const path = join(dir, entry.header.name);
      await Deno.mkdir(join(path, ".."), { recursive: true });
      const file = await Deno.open(path, { write: true, create: true });
      for await (const c of entry) {
        const bytes = c as Uint8Array;
        for (let at = 0; at < bytes.length;) at += await file.write(bytes.subarray(at));
      }
      file.close();
      names.push(entry.header.name);
    }
  })();
  for await (const chunk of body) extract.write(chunk);
  extract.end(() => {});
  await done;
  return names;
}

Deno.test({
  name: "GET /export: the active plan as a tar of a Nemotron-NAS checkpoint that serves the same logits",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    const ADMIN = "export-admin-token";
    const server = await startServer(["--device", "wasm", "--admin-token", ADMIN]);
    const dir = await Deno.makeTempDir({ prefix: "fusedge-export-http-" });
    const auth = { authorization: `Bearer ${ADMIN}` };
    try {
      await server.ready;
      const plan = { ffn_groups: [[3, 4, 5], [6, 7, 8]] };
      const swap = await fetch(`${server.base}/fuse`, {
        method: "POST",
        headers: { ...auth, "content-type": "application/json" },
        body: JSON.stringify(plan),
      });
      assert.equal(swap.status, 200);
      await swap.body?.cancel();

      const unauthorised = await fetch(`${server.base}/export`);
      assert.equal(unauthorised.status, 401);
      await unauthorised.body?.cancel();
      // An export is work a page the operator visits must not start: another site's request is 403,
      // as on every state-changing route.
      const crossSite: Record<string, string>[] = [{ origin: "http://evil.example" }, {
        "sec-fetch-site": "cross-site",
      }];
      for (const headers of crossSite) {
        const cross = await fetch(`${server.base}/export`, { headers: { ...auth, ...headers } });
        assert.equal(cross.status, 403);
        assert.match((await cross.json()).error.message, /cross-site request/);
      }
      const bad = await fetch(`${server.base}/export?dtype=int3`, { headers: auth });
      assert.equal(bad.status, 400);
      assert.equal((await bad.json()).error.param, "dtype");

      // One at a time: a second export while the first is written is 409.
      const [a, b] = await Promise.all([
        fetch(`${server.base}/export?dtype=fp32`, { headers: auth }),
        fetch(`${server.base}/export?dtype=fp32`, { headers: auth }),
      ]);
      const [ok, busy] = a.status === 200 ? [a, b] : [b, a];
      assert.equal(busy.status, 409);
      await busy.body?.cancel();
      assert.equal(ok.status, 200);
      assert.equal(ok.headers.get("content-type"), "application/x-tar");
      const names = await untar(ok.body!, dir);
      const root = "tiny-nas-ffn_3-5_6-8_";
      for (
        const f of [
          "config.json",
          "model.safetensors",
          "tokenizer.json",
          "generation_config.json",
          "README.md",
        ]
      ) {
        assert.ok(names.includes(`${root}/${f}`), `${f} in ${names}`);
      }
      // Completions keep being served around an export.
      const served = await post(server.base, "/v1/completions", { prompt: "x", max_tokens: 2 });
      assert.equal(served.status, 200);
      await served.body?.cancel();

      const c = (await golden(TINY_NAS)).cases[0];
      const exported = await buildInstance(await loadAssets(join(dir, root)), UNFUSED, "wasm");
      const source = await buildInstance(await loadAssets(TINY_NAS), parsePlan(plan), "wasm");
      const x = await exported.logitsOf(c.input_ids);
      const y = await source.logitsOf(c.input_ids);
      assert.ok(relL2(x, y) <= 1e-5, `${relL2(x, y)}`);
      await exported.release();
      await source.release();
    } finally {
      await server.stop();
      await Deno.remove(dir, { recursive: true });
    }
  },
});
