import assert from "node:assert/strict";
import { moduleUrl, probe } from "./helpers.ts";

Deno.test("free memory: what threads freed inside glibc's arenas goes back to the system", async () => {
  // 64 KB blocks come from an arena (below glibc's mmap threshold); one in sixteen kept alive keeps
  // the arena from shrinking at its top, as a build's long-lived allocations do.
  const { value: v } = await probe<{ trimmed: boolean; held: number; after: number }>(`
    import { returnFreeMemory } from "${moduleUrl("src/free_memory.ts")}";
    const before = status("VmRSS");
    const blocks = Array.from({ length: 3200 }, () => new Uint8Array(64 << 10).fill(1));
    blocks.forEach((b, i) => i % 16 === 15 || b.buffer.transfer(0));
    const held = status("VmRSS") - before;
    const trimmed = returnFreeMemory();
    console.log(JSON.stringify({ trimmed, held, after: status("VmRSS") - before }));
  `);
  assert.ok(v.trimmed, "malloc_trim did not run");
  assert.ok(v.held > 150e6, `the blocks held ${(v.held / 1e6).toFixed(0)} MB once freed`);
  assert.ok(
    v.after < v.held - 120e6,
    `${(v.held / 1e6).toFixed(0)} MB before the trim, ${(v.after / 1e6).toFixed(0)} after`,
  );
});
