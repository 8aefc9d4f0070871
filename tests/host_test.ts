import assert from "node:assert/strict";
import {
  BusyError,
  CancelledError,
  CapacityError,
  InputError,
  InvalidPlanError,
  UnavailableError,
} from "../src/errors.ts";
import { type FusionPlan, planId, UNFUSED } from "../src/fusion/plan.ts";
import { type InstanceBuilder, ModelHost } from "../src/serving/host.ts";
import type { PendingBuild, PlanInstance } from "../src/instance/remote_instance.ts";
import type { RemoteTokenizer } from "../src/serving/remote_tokenizer.ts";
import { Scheduler } from "../src/serving/scheduler.ts";
import { FLOAT_WEIGHTS } from "../src/onnx/format.ts";
import { ROOT } from "./helpers.ts";
import { PUBLISHED_CONFIGS } from "../src/model/published_configs.ts";

const MODEL = `${ROOT}/models/tiny-nas`;

Deno.test("scheduler: slots, FIFO queue, 429 past the queue, cancellation while queued, idle", async () => {
  const s = new Scheduler(2, 1);
  const a = await s.acquire();
  const b = await s.acquire();
  assert.equal(s.active, 2);
  const order: string[] = [];
  const queued = s.acquire().then((r) => (order.push("queued"), r));
  assert.equal(s.queued, 1);
  const full = s.acquire();
  await assert.rejects(full, (e) => e instanceof CapacityError && e.retryAfterSeconds >= 1);
  a();
  a(); // a second release of the same slot is a no-op
  const c = await queued;
  assert.deepEqual(order, ["queued"]);
  assert.equal(s.active, 2);
  const abort = new AbortController();
  const waiting = s.acquire(abort.signal);
  abort.abort();
  await assert.rejects(waiting, CancelledError);
  assert.equal(s.queued, 0, "a cancelled request leaves the queue without running");
  await assert.rejects(s.acquire(AbortSignal.abort()), CancelledError);
  let idle = false;
  const whenIdle = s.idle().then(() => (idle = true));
  b();
  await Promise.resolve();
  assert.equal(idle, false);
  c();
  await whenIdle;
  assert.equal(s.active, 0);
});

/** A plan instance that records whether it was closed; generations are not needed here. */
function fakeInstance(plan: FusionPlan, log: string[]): PlanInstance {
  return {
    plan,
    planId: planId(plan),
    device: "wasm",
    ffnBlocks: 9,
    buildMs: 1,
    graph: FLOAT_WEIGHTS,
    weightBytes: 1,
    kvBytesPerToken: 1,
    kvBytes: 0,
    generate: () => {
      throw new Error("not used");
    },
    checkGrammar: () => Promise.reject(new Error("not used")),
    close: () => {
      log.push(`closed ${planId(plan)}`);
      return Promise.resolve();
    },
  };
}

/** Builds finish when the test says so; cancellation is recorded. */
function controlledBuilder(log: string[]) {
  const finish = new Map<string, () => void>();
  const dirs = new Map<string, string>();
  const builder: InstanceBuilder = ({ checkpoint, plan, weightDir }) => {
    const id = planId(plan);
    log.push(`build ${id}${checkpoint ? " (shared weights)" : ""}`);
    // What a worker's build writes: its converted weights, in the directory it was given, each an
    // entry the host keeps while an instance uses it.
    const file = `${weightDir}/w.bin`;
    Deno.writeFileSync(file, new Uint8Array(8));
    dirs.set(id, weightDir);
    let reject: (e: Error) => void = () => {};
    const ready = new Promise<Awaited<PendingBuild["ready"]>>((res, rej) => {
      reject = rej;
      const added = new Map([[`w/${id}`, { elem: "uint8" as const, dims: [8], byteLength: 8, file }]]);
      const weights = { rebuiltBytes: 8, reusedBytes: 0, added, keys: [`w/${id}`] };
      finish.set(
        id,
        () => res({ instance: fakeInstance(plan, log), checkpoint: null, weights, sessionMs: 1 }),
      );
    });
    return {
      ready,
      cancel: (reason) => {
        log.push(`cancel ${id}`);
        reject(new BusyError(reason));
      },
    };
  };
  return { builder, finish: (plan: FusionPlan) => finish.get(planId(plan))!(), dirs };
}

const fakeTokenizer = { maxTokenChars: 8, close() {} } as unknown as RemoteTokenizer;
const plan = (...groups: number[][]): FusionPlan => ({ version: 1, ffn_groups: groups });

Deno.test("model host: leases, retire after the last lease, invalid plans, superseded builds", async () => {
  const log: string[] = [];
  const { builder, finish, dirs } = controlledBuilder(log);
  const host = new ModelHost(builder);
  assert.throws(() => host.lease(), UnavailableError);
  const loading = host.load(MODEL, UNFUSED, "wasm", undefined, fakeTokenizer);
  await new Promise((r) => setTimeout(r, 50));
  finish(UNFUSED);
  await loading;
  assert.equal(host.state, "ready");
  assert.equal(host.instance!.planId, "unfused");

  // An invalid plan is refused before anything is built, and the active plan stays.
  await assert.rejects(host.swap(plan([1, 2])), InvalidPlanError);
  assert.equal(log.filter((l) => l.startsWith("build")).length, 1);

  // A request holds the old instance across a swap; it is closed after its last lease only.
  const lease = host.lease();
  const swap = host.swap(plan([3, 4]));
  assert.equal(host.swapInProgress, true);
  // A newer swap supersedes the pending build: the older call fails with BusyError.
  const newer = host.swap(plan([5, 6, 7]));
  await assert.rejects(swap, BusyError);
  finish(plan([5, 6, 7]));
  const { instance } = await newer;
  assert.equal(instance.planId, "ffn[5-7]");
  assert.equal(host.instance!.planId, "ffn[5-7]");
  assert.equal(host.swapInProgress, false);
  assert.equal(lease.instance.planId, "unfused");
  assert.equal(host.retiringCount, 1);
  assert.ok(!log.includes("closed unfused"), "still leased");
  lease.release();
  lease.release(); // twice is harmless
  assert.equal(host.retiringCount, 0);
  assert.equal(host.liveInstances, 1);
  assert.ok(log.includes("closed unfused"));
  assert.deepEqual(log.filter((l) => l.startsWith("build") || l.startsWith("cancel")), [
    "build unfused",
    "build ffn[3-4]",
    "cancel ffn[3-4]",
    "build ffn[5-7]",
  ]);
  assert.equal(host.swaps, 1);
  // The cancelled build's weights are discarded; the built ones' stay until the host closes.
  const exists = (path: string) => Deno.stat(path).then(() => true, () => false);
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(await exists(dirs.get("ffn[3-4]")!), false);
  assert.equal(await exists(dirs.get("ffn[5-7]")!), true);
  await host.close();
  assert.ok(log.includes("closed ffn[5-7]"));
  assert.equal(await exists(dirs.get("unfused")!), false, "closing removes the weights directory");
});

Deno.test("model host: a pending build's weight files are not deleted under it; its end deletes what none uses", async () => {
  const { builder, finish, dirs } = controlledBuilder([]);
  const host = new ModelHost(builder);
  const exists = (path: string) => Deno.stat(path).then(() => true, () => false);
  const loading = host.load(MODEL, UNFUSED, "wasm", undefined, fakeTokenizer);
  await new Promise((r) => setTimeout(r, 20));
  finish(UNFUSED);
  await loading;
  const unfused = `${dirs.get("unfused")}/w.bin`;
  const lease = host.lease();
  const first = host.swap(plan([3, 4]));
  finish(plan([3, 4]));
  await first;
  // A build starts (it may read the unfused plan's files); the unfused plan's last lease ends meanwhile.
  const second = host.swap(plan([5, 6, 7]));
  lease.release();
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(await exists(unfused), true, "kept while a build is pending");
  finish(plan([5, 6, 7]));
  await second;
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(await exists(unfused), false, "deleted once no live plan and no build uses it");
  assert.equal(await exists(`${dirs.get("ffn[5-7]")}/w.bin`), true);
  assert.equal(host.weightCacheBytes, 8);
  await host.close();
});

Deno.test("scheduler: KV reservations count every row at the longest, wait in FIFO order, and refuse what never fits", async () => {
  const kv = { budgetBytes: 1000, bytesPerToken: () => 10 };
  const s = new Scheduler(8, 8, kv);
  const a = await s.reserveKv(40);
  assert.equal(s.kvReservedBytes(), 400);
  const b = await s.reserveKv(20);
  assert.equal(s.kvReservedBytes(), 2 * 40 * 10, "rows padded to the longest");
  const granted: string[] = [];
  const c = s.reserveKv(50).then((free) => (granted.push("c"), free));
  const d = s.reserveKv(10).then((free) => (granted.push("d"), free));
  await new Promise((r) => setTimeout(r, 5));
  assert.deepEqual(granted, [], "3 x 50 x 10 > 1000: c waits, and d waits behind it");
  a();
  await new Promise((r) => setTimeout(r, 5));
  assert.deepEqual(granted, ["c"], "b and c: 2 x 50 x 10 fits; with d, 3 x 50 x 10 would not");
  assert.equal(s.kvReservedBytes(), 1000);
  b();
  await new Promise((r) => setTimeout(r, 5));
  assert.deepEqual(granted, ["c", "d"]);
  (await c)();
  (await d)();
  assert.equal(s.kvReservedBytes(), 0);
  await assert.rejects(s.reserveKv(101), (e: Error) => e instanceof InputError && /KV cache/.test(e.message));
  const big = await s.reserveKv(100);
  await assert.rejects(s.reserveKv(1, AbortSignal.abort()), CancelledError, "already gone: never queued");
  const abort = new AbortController();
  const waiting = s.reserveKv(1, abort.signal);
  abort.abort();
  await assert.rejects(waiting, CancelledError);
  big();
});

Deno.test("scheduler: a static KV cache (slots) takes any output length up to its slot and refuses a prompt it cannot hold", async () => {
  const kv = { budgetBytes: 1000, bytesPerToken: () => 10, slotTokens: () => 100 };
  const s = new Scheduler(8, 8, kv);
  // The slot is the sequence's context: more output than it holds is cut there, not refused.
  const frees = await Promise.all(
    [1, 2, 3].map(() => s.reserveKv(500, undefined, { tokens: 60, field: "prompt" })),
  );
  assert.equal(s.kvReservedBytes(), 3 * 100 * 10);
  for (const free of frees) free();
  assert.equal(s.kvReservedBytes(), 0);
  await assert.rejects(
    s.reserveKv(120, undefined, { tokens: 100, field: "messages" }),
    (e: Error) =>
      e instanceof InputError && e.field === "messages" &&
      /100 prompt tokens and one generated do not fit a KV slot of 100 tokens/.test(e.message),
  );
});

Deno.test("model host: the unfused reference beside a fused plan is built once, shared, and closed when idle or redundant", async () => {
  const log: string[] = [];
  const { builder, finish } = controlledBuilder(log);
  const host = new ModelHost(builder);
  host.referenceIdleMs = 30;
  const tick = (ms = 20) => new Promise((r) => setTimeout(r, ms));
  await assert.rejects(host.leaseUnfused(), UnavailableError, "nothing before the model loads");
  const loading = host.load(MODEL, plan([3, 4]), "wasm", undefined, fakeTokenizer);
  await tick();
  finish(plan([3, 4]));
  await loading;

  // Two comparisons at once share one build.
  const [first, second] = [host.leaseUnfused(), host.leaseUnfused()];
  await tick();
  finish(UNFUSED);
  const [a, b] = await Promise.all([first, second]);
  assert.equal(a.instance.planId, "unfused");
  assert.equal(a.instance, b.instance);
  assert.equal(host.instance!.planId, "ffn[3-4]", "the active plan is untouched");
  assert.deepEqual(log.filter((l) => l.startsWith("build")), ["build ffn[3-4]", "build unfused"]);
  assert.equal(host.liveInstances, 2);
  a.release();
  b.release();
  await tick(80);
  assert.ok(log.includes("closed unfused"), "closed after its idle time");
  assert.equal(host.liveInstances, 1);

  // Built again on demand; a swap to the unfused plan makes it redundant: it closes after its lease.
  const again = host.leaseUnfused();
  await tick();
  finish(UNFUSED);
  const c = await again;
  const swap = host.swap(UNFUSED);
  await tick();
  finish(UNFUSED);
  await swap;
  assert.equal(log.filter((l) => l === "closed unfused").length, 1, "still leased");
  c.release();
  assert.equal(log.filter((l) => l === "closed unfused").length, 2);
  // With the unfused plan active, the comparison is the active instance: nothing is built.
  const d = await host.leaseUnfused();
  assert.equal(d.instance, host.instance);
  d.release();
  assert.equal(
    log.filter((l) => l.startsWith("build unfused")).length,
    3,
    "two references and the swap",
  );
  await host.close();
});

Deno.test("model host: a wide quantized model's first build quantizes on every core, a swap's on half", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify(PUBLISHED_CONFIGS["llama-3.2-1b"]));
    const cores = navigator.hardwareConcurrency || 1;
    for (
      const [graph, first, swap] of [
        [{ dtype: "fp32", quantize: "int8" }, cores, Math.max(1, Math.floor(cores / 2))],
        [FLOAT_WEIGHTS, 1, 1],
      ] as const
    ) {
      const threads: (number | undefined)[] = [];
      const log: string[] = [];
      const { builder, finish } = controlledBuilder(log);
      const host = new ModelHost((spec) => (threads.push(spec.convertThreads), builder(spec)));
      const loading = host.load(dir, UNFUSED, "cpu", { graph, maxContext: 256 }, fakeTokenizer);
      await new Promise((r) => setTimeout(r, 50));
      finish(UNFUSED);
      await loading;
      const removed: FusionPlan = {
        version: 2,
        attention: { remove: [4], linear: [] },
        ffn_groups: [[3, 4]],
        block_groups: [],
      };
      const swapping = host.swap(removed);
      await new Promise((r) => setTimeout(r, 50));
      finish(removed);
      await swapping;
      assert.deepEqual(threads, [first, swap], `${JSON.stringify(graph)}`);
      await host.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
