import assert from "node:assert/strict";
import { join } from "node:path";
import { ROOT } from "./helpers.ts";
import { post, startServer } from "./server_helpers.ts";

/** Where scripts/compile can find Deno's slim runtime without the network. */
function denortAvailable(): boolean {
  if (Deno.env.get("DENORT_BIN")) return true;
  const zip = "denort-x86_64-unknown-linux-gnu.zip";
  const denoDir = Deno.env.get("DENO_DIR") ?? join(Deno.env.get("HOME") ?? "/root", ".cache", "deno");
  for (const p of [join(ROOT, "..", "shared", "tools", zip), join(denoDir, "dl", "release", "v2.9.6", zip)]) {
    try {
      Deno.statSync(p);
      return true;
    } catch { /* not there */ }
  }
  return false;
}

const HAS_DENORT = denortAvailable();
if (!HAS_DENORT) {
  console.warn(
    "deno compile test skipped: no denort (Deno's download host is unreachable here; see scripts/compile)",
  );
}

Deno.test({
  name: "deno compile: one binary serves the embedded model from any working directory",
  ignore: !HAS_DENORT,
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const dir = await Deno.makeTempDir();
    const bin = join(dir, "fusedge");
    const built = await new Deno.Command("bash", { args: [join(ROOT, "scripts", "compile"), bin] }).output();
    assert.equal(built.code, 0, new TextDecoder().decode(built.stderr));
    const server = await startServer(["--device", "wasm"], bin);
    try {
      await server.ready;
      const res = await post(server.base, "/v1/completions", {
        prompt: "def main(",
        max_tokens: 8,
        temperature: 0,
      });
      assert.equal(res.status, 200);
      assert.equal((await res.json()).usage.completion_tokens, 8);
    } finally {
      await server.stop();
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test("every thread's entry point lives in src/workers/, which scripts/compile includes", async () => {
  const script = await Deno.readTextFile(join(ROOT, "scripts", "compile"));
  assert.match(script, /--include "\$path"/);
  assert.match(script, / src\/workers; do/);
  const started: string[] = [];
  const walk = async (dir: string) => {
    for await (const e of Deno.readDir(join(ROOT, dir))) {
      if (e.isDirectory) await walk(`${dir}/${e.name}`);
      else if (e.name.endsWith(".ts")) {
        const text = await Deno.readTextFile(join(ROOT, dir, e.name));
        // Workers and the template renderer are started by URL: a compiled binary has only what it includes.
        for (
          const [, spec] of text.matchAll(/new URL\("([^"]+(?:_worker|_process)\.ts)", import\.meta\.url\)/g)
        ) {
          started.push(join(dir, spec));
        }
      }
    }
  };
  await walk("src");
  assert.ok(started.length >= 5, `${started}`);
  for (const path of started) {
    assert.ok(path.startsWith("src/workers/"), `${path} is started outside src/workers/`);
  }
});
