import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { ROOT } from "./helpers.ts";

const DOCS = [
  "README.md",
  ...[...Deno.readDirSync(join(ROOT, "docs"))]
    .filter((e) => e.name.endsWith(".md"))
    .map((e) => join("docs", e.name)),
];

Deno.test("docs: the README is a manual (under 250 lines) and every doc's links and cited files exist", async () => {
  const readme = await Deno.readTextFile(join(ROOT, "README.md"));
  assert.ok(readme.split("\n").length < 250, `README.md has ${readme.split("\n").length} lines`);
  for (const doc of DOCS) {
    const text = await Deno.readTextFile(join(ROOT, doc));
    // Nothing outside the repository: the docs cite the project's own files and results.
    assert.doesNotMatch(text, /\.\.\/shared/, `${doc} names a file outside the repository`);
    for (const [, target] of text.matchAll(/\]\(([^)#\s]+)(?:#[^)]*)?\)/g)) {
      if (/^[a-z]+:/.test(target)) continue;
      const from = doc.startsWith("docs/") ? join(ROOT, "docs") : ROOT;
      assert.ok(existsSync(join(from, target)), `${doc} links to ${target}, which does not exist`);
    }
    for (const [file] of text.matchAll(/bench\/results\/[\w.-]+\.(?:txt|json)/g)) {
      assert.ok(existsSync(join(ROOT, file)), `${doc} cites ${file}, which does not exist`);
    }
    // Source files the docs point a reader at are where they say.
    for (const [, file] of text.matchAll(/`((?:src|tests|scripts|bench|kernels)\/[\w./-]+\.(?:ts|wgsl))`/g)) {
      assert.ok(existsSync(join(ROOT, file)), `${doc} names ${file}, which does not exist`);
    }
  }
});
