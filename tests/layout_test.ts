import assert from "node:assert/strict";
import { dirname, join, normalize, relative } from "node:path";
import { ROOT } from "./helpers.ts";

/**
 * The rooms of src/, lowest first: data flows up (checkpoint -> plan -> weights -> graph -> session
 * -> tokens -> requests), so a module imports only from its own folder or from a lower layer. The
 * thread plumbing every layer may use (background jobs, worker errors, the location fix) sits with
 * the worker entry points in src/workers/ but at the bottom.
 */
const LAYERS: string[][] = [
  ["."],
  ["workers:plumbing"],
  ["model"],
  ["onnx", "webgpu", "sampling", "fusion"],
  ["ort"],
  ["decode"],
  ["instance"],
  ["bench", "export"],
  ["serving", "requests"],
  ["server", "client"],
  ["cli", "workers"],
];
const PLUMBING = new Set(["workers/background.ts", "workers/worker_error.ts", "workers/worker_location.ts"]);

const SRC = join(ROOT, "src");

function room(path: string): string {
  if (PLUMBING.has(path)) return "workers:plumbing";
  return path.includes("/") ? path.split("/")[0] : ".";
}

const rank = (r: string) => LAYERS.findIndex((layer) => layer.includes(r));

/** Every module under src/ and the modules it imports (type-only ones too), as paths under src/. */
async function importGraph(): Promise<Map<string, string[]>> {
  const graph = new Map<string, string[]>();
  const walk = async (dir: string) => {
    for await (const e of Deno.readDir(join(SRC, dir))) {
      const path = dir ? `${dir}/${e.name}` : e.name;
      if (e.isDirectory) await walk(path);
      else if (e.name.endsWith(".ts")) {
        const text = await Deno.readTextFile(join(SRC, path));
        const specs = [...text.matchAll(/(?:\bfrom|^import|\bimport\()\s*["'](\.{1,2}\/[^"']+)["']/gm)]
          .map((m) => relative(SRC, normalize(join(SRC, dirname(path), m[1]))));
        graph.set(path, specs);
      }
    }
  };
  await walk("");
  return graph;
}

Deno.test("layout: every room of src/ has a layer and imports only from its own folder or below", async () => {
  const graph = await importGraph();
  assert.ok(graph.size > 100, `${graph.size} modules`);
  const upward: string[] = [];
  for (const [from, targets] of graph) {
    assert.ok(rank(room(from)) >= 0, `src/${from}: its folder has no layer in tests/layout_test.ts`);
    for (const to of targets) {
      assert.ok(graph.has(to), `src/${from} imports src/${to}, which does not exist`);
      const [a, b] = [room(from), room(to)];
      if (a === b || from.split("/")[0] === to.split("/")[0] && !PLUMBING.has(to)) continue;
      if (rank(b) >= rank(a)) upward.push(`src/${from} -> src/${to}`);
    }
  }
  assert.deepEqual(upward, [], "imports that run up or across the layers");
});

Deno.test("layout: no import cycles in src/, type-only imports included", async () => {
  const graph = await importGraph();
  const state = new Map<string, "open" | "done">();
  const cycles: string[] = [];
  const visit = (node: string, path: string[]) => {
    state.set(node, "open");
    for (const next of graph.get(node) ?? []) {
      if (state.get(next) === "open") cycles.push([...path.slice(path.indexOf(next)), next].join(" -> "));
      else if (!state.has(next)) visit(next, [...path, next]);
    }
    state.set(node, "done");
  };
  for (const node of graph.keys()) if (!state.has(node)) visit(node, [node]);
  assert.deepEqual(cycles, []);
});
