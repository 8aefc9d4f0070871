/// <reference lib="deno.worker" />
/**
 * One plan's model, owned by one worker: it fuses the weights, builds the graph, creates the
 * onnxruntime sessions and then runs every generation leased to that plan, as one batch (its engine). Building and decoding
 * here keeps the serving thread free: a swap builds in a new worker while the old one keeps
 * decoding, and a retired plan is freed whole by ending its worker.
 */
import "./worker_location.ts";
import { loadCheckpoint } from "../model/checkpoint.ts";
import { formatName } from "../onnx/format.ts";
import { WeightCache } from "../onnx/weight_cache.ts";
import { assetsFrom, buildInstance, type ModelInstance } from "../instance/build.ts";
import type { GenerationSummary } from "../decode/generate.ts";
import { resolveDevice } from "../ort/ort.ts";
import { useThreads } from "../ort/threads.ts";
import { toWorkerError } from "./worker_error.ts";
import { returnFreeMemory } from "../free_memory.ts";
import type { InstanceReply, InstanceRequest } from "../instance/protocol.ts";

/** What a grammar check's `done` carries: it generated nothing. */
const CHECKED: GenerationSummary = {
  finishReason: "stop",
  promptTokens: 0,
  completionTokens: 0,
  text: "",
  ids: [],
  cachedTokens: 0,
};

/** Positions of prompt logprobs a message carries (~3 ms to decode on the serving thread). */
const PROMPT_PART = 128;

let instance: ModelInstance | null = null;
const post = (m: InstanceReply) => self.postMessage(m);
const failure = (id: number | null, e: unknown): InstanceReply => ({
  type: "failed",
  id,
  ...toWorkerError(e),
});

async function build(req: Extract<InstanceRequest, { type: "build" }>): Promise<void> {
  const device = await resolveDevice(req.device);
  await useThreads(device, req.threads);
  const loaded = req.checkpoint ? null : await loadCheckpoint(req.modelDir, { maxContext: req.maxContext });
  const assets = await assetsFrom(req.checkpoint ?? loaded!, req.modelDir, req.calibrationText);
  const weights = new WeightCache(formatName(req.graph), req.weights, req.weightDir);
  instance = await buildInstance(
    assets,
    req.plan,
    device,
    req.graph,
    weights,
    (stage, done, total) => post({ type: "progress", stage, done, total }),
    {
      kvBudgetBytes: req.kvBudgetBytes,
      prefixCacheBytes: req.prefixCacheBytes,
      slots: req.slots,
      onKv: (bytes) => post({ type: "kv", bytes }),
      convert: req.convert,
    },
  );
  // Serving must not wait for a batch size's first step to be recorded: all of them are, now.
  await instance.decoder?.warm();
  const layout = instance.decoder?.layout;
  post({
    type: "built",
    buildMs: instance.buildMs,
    sessionMs: instance.sessionMs,
    ffnBlocks: instance.ffnBlocks,
    planId: instance.planId,
    weightBytes: instance.weightBytes,
    rebuiltBytes: instance.rebuiltBytes,
    reusedBytes: instance.reusedBytes,
    addedWeights: weights.added,
    weightKeys: [...weights.used],
    checkpoint: loaded,
    kvBytesPerToken: instance.engine.bytesPerToken,
    ...(layout ? { slots: { count: layout.slots, tokens: layout.capacity } } : {}),
    heal: instance.heal,
  });
  // What the build freed goes back after "built", so neither a start nor a swap waits for it.
  returnFreeMemory();
  // After "built", so neither a start nor a swap waits for it; errors surface at the first grammar.
  setTimeout(() => instance?.engine.prepareGrammars().catch(() => {}), 0);
}

function run(req: Extract<InstanceRequest, { type: "generate" }>): void {
  instance!.engine.submit(req.id, req.promptIds, req.params, {
    chunk: (chunk) => {
      const lps = chunk.promptLogprobs;
      if (!lps || lps.length <= PROMPT_PART) return post({ type: "chunk", id: req.id, chunk });
      // The serving thread decodes each message whole: a long echo's logprobs (thousands of
      // positions, 21 entries each) arrive in parts, so no one part holds it for long.
      const last = Math.floor((lps.length - 1) / PROMPT_PART) * PROMPT_PART;
      for (let at = 0; at < last; at += PROMPT_PART) {
        post({ type: "promptPart", id: req.id, logprobs: lps.slice(at, at + PROMPT_PART) });
      }
      post({ type: "chunk", id: req.id, chunk: { ...chunk, promptLogprobs: lps.slice(last) } });
    },
    done: (summary) => post({ type: "done", id: req.id, summary }),
    failed: (e) => post(failure(req.id, e)),
  });
}

self.onmessage = async (e: MessageEvent<InstanceRequest>) => {
  const m = e.data;
  switch (m.type) {
    case "build":
      try {
        await build(m);
      } catch (err) {
        post(failure(null, err));
      }
      break;
    case "generate":
      run(m);
      break;
    case "cancel":
      instance?.engine.cancel(m.id);
      break;
    case "grammar":
      instance!.engine.checkGrammar(m.spec).then(
        () => post({ type: "done", id: m.id, summary: CHECKED }),
        (err) => post(failure(m.id, err)),
      );
      break;
    case "close":
      await instance?.release().catch(() => {});
      post({ type: "closed" });
      break;
  }
};
