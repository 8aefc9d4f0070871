import { applyPlan, type FusionHeal } from "../fusion/apply.ts";
import { healPlan, type HealReport } from "../fusion/heal.ts";
import { healRunner } from "./heal_runner.ts";
import { type FusionPlan, healable, linearAttention, planId } from "../fusion/plan.ts";
import { FIT_SLICE, lazyLinearAttention } from "../fusion/linear_fit.ts";
import { textSlices, textWindows } from "../fusion/calibration.ts";
import { InputError } from "../errors.ts";
import { type Block, unfusedBlocks } from "../model/blocks.ts";
import {
  type Checkpoint,
  type LinearWeights,
  loadCheckpoint,
  type LoadOptions,
  modelName,
} from "../model/checkpoint.ts";
import { attachFiles, releaseDecoded } from "../model/safetensors.ts";
import { TextTokenizer } from "../model/tokenizer.ts";
import { buildDecoderGraph, type DecoderGraph, servedWeightBytes } from "../onnx/decoder.ts";
import { convertInline } from "../onnx/quantize.ts";
import { ConvertPool, type HelperBuffers } from "../onnx/convert_pool.ts";
import { FLOAT_WEIGHTS, formatName, type GraphOptions } from "../onnx/format.ts";
import { DEFAULT_SPLIT_K, type SplitK } from "../onnx/split_k.ts";
import { WeightCache } from "../onnx/weight_cache.ts";
import { BatchEngine } from "../decode/batch_engine.ts";
import type { EngineBase, Sequence } from "../decode/engine_base.ts";
import { GpuBatchEngine } from "../decode/gpu_engine.ts";
import { kvBytesPerToken } from "../ort/kv_batch.ts";
import { kvBudgetBytes } from "../ort/memory.ts";
import type { Backend, Device } from "../ort/ort.ts";
import { attentionFor, ModelSession, samplesInGraph } from "../ort/session.ts";
import { bucketsFor, SlotDecoder } from "../ort/slot_decoder.ts";

/** What loading a checkpoint directory gives: everything plan-independent, loaded once. */
export interface ModelAssets {
  checkpoint: Checkpoint;
  tokenizer: TextTokenizer;
  /** Text the linear maps of a plan's `attention.linear` layers are fitted on. */
  calibrationText?: string;
  /** The unfused block list the plans are applied to. */
  blocks: Block[];
  name: string;
}

/** What decodes a plan instance's sequences: on the host's caches (WASM, native) or in GPU slots. */
export type Engine = EngineBase<Sequence>;

/** A runnable model under one plan: fused weights, graph, onnxruntime sessions and the engine over them. */
export interface ModelInstance {
  plan: FusionPlan;
  planId: string;
  device: Backend;
  /** Decodes every sequence submitted to it, together. */
  engine: Engine;
  /** The session over host caches (WASM, native); null on WebGPU, where `decoder` runs the graph. */
  session: ModelSession | null;
  decoder: SlotDecoder | null;
  /** Logits [ids.length, vocab] of a whole sequence from an empty cache (scoring). */
  logitsOf(ids: number[]): Promise<Float32Array>;
  /** Nodes and MatMuls of the decoder graph. */
  nodeCount: number;
  matmulCount: number;
  /** Frees the sessions and their memory (GPU buffers included). */
  release(): Promise<void>;
  /** FFN MatMul triples in the graph: one per unfused FFN, one per fused group. */
  ffnBlocks: number;
  buildMs: number;
  /** Of buildMs, the time onnxruntime took to create the session (the rest: fusing and converting). */
  sessionMs: number;
  graph: GraphOptions;
  /** Bytes of the weights as served (after quantization): the graph's, and a table the host reads rows from. */
  weightBytes: number;
  /** Of those, the bytes this build converted, and the bytes it found converted by earlier builds. */
  rebuiltBytes: number;
  reusedBytes: number;
  /** What healing the plan's fused groups did, when the plan asks for it. */
  heal?: HealReport;
}

export async function loadAssets(
  dir: string,
  opts: LoadOptions = {},
  calibrationText?: string,
): Promise<ModelAssets> {
  return await assetsFrom(await loadCheckpoint(dir, opts), dir, calibrationText);
}

/** Assets around a loaded checkpoint, one posted from another thread included (its files reattached). */
export async function assetsFrom(
  checkpoint: Checkpoint,
  dir: string,
  calibrationText?: string,
): Promise<ModelAssets> {
  attachFiles(checkpoint);
  const tokenizer = await TextTokenizer.load(dir);
  return { checkpoint, tokenizer, calibrationText, blocks: unfusedBlocks(checkpoint), name: modelName(dir) };
}

/** The fitted maps a plan's linear attentions need, fitted lazily (see lazyLinearAttention). */
async function planFits(assets: ModelAssets, plan: FusionPlan): Promise<Map<number, LinearWeights>> {
  const layers = linearAttention(plan);
  if (layers.length === 0) return new Map();
  if (!assets.calibrationText) {
    throw new InputError("attention.linear needs calibration text to fit the maps on", "calibration");
  }
  const cfg = assets.checkpoint.config;
  const windows = await textWindows(assets.calibrationText, assets.tokenizer, {
    ...FIT_SLICE,
    window: Math.min(FIT_SLICE.window, cfg.maxPositions),
  });
  return lazyLinearAttention(assets.checkpoint, layers, windows);
}

/** A plan's healing, fitted once per loaded model and plan (a serving build worker loads its own). */
const heals = new WeakMap<ModelAssets, Map<string, Promise<{ heal: FusionHeal; report: HealReport }>>>();

/**
 * Heals the plan's fused groups on its calibration slice (fusion/heal.ts), gathering and scoring
 * through onnxruntime on `device` (instance/heal_runner.ts).
 */
function planHeal(
  assets: ModelAssets,
  plan: FusionPlan,
  fits: Map<number, LinearWeights>,
  device: Device,
  onProgress?: (stage: string, done: number, total: number) => void,
): Promise<{ heal: FusionHeal; report: HealReport }> {
  const settings = plan.heal!;
  const known = heals.get(assets) ?? new Map();
  heals.set(assets, known);
  const id = planId(plan);
  const cached = known.get(id);
  if (cached) return cached;
  const run = (async () => {
    if (!assets.calibrationText) {
      throw new InputError("heal needs calibration text to fit on (--calibration)", "calibration");
    }
    const cfg = assets.checkpoint.config;
    const window = Math.min(256, cfg.maxPositions);
    const wanted = [
      { what: "calibration", skip: settings.skip_tokens, max: settings.calibration_tokens, window },
      {
        what: "held-out",
        skip: settings.skip_tokens + settings.calibration_tokens,
        max: settings.heldout_tokens,
        window,
      },
    ];
    const [calibration, heldout] = await textSlices(assets.calibrationText, assets.tokenizer, wanted);
    [calibration, heldout].forEach((ws, i) => {
      const { what, skip, max } = wanted[i];
      const n = ws.reduce((a, w) => a + w.length, 0);
      if (n < max / 2) {
        throw new InputError(
          `heal: the calibration text has ${n} of the ${max} ${what} tokens asked for after skipping ${skip}`,
          "heal",
        );
      }
    });
    return await healPlan({
      ckpt: assets.checkpoint,
      blocks: assets.blocks,
      plan,
      fits,
      calibration,
      heldout,
      onProgress,
      ...healRunner(assets.checkpoint, heldout, device),
    });
  })();
  known.set(id, run);
  run.catch(() => known.delete(id));
  return run;
}

/** The model's blocks under a checked plan: fused FFNs (healed if asked), linear attentions fitted, removed ones gone. */
export async function planBlocks(
  assets: ModelAssets,
  plan: FusionPlan,
  onProgress?: (stage: string, done: number, total: number) => void,
  healDevice: Device = "wasm",
): Promise<{ blocks: Block[]; heal?: HealReport }> {
  const fits = await planFits(assets, plan);
  if (!plan.heal || !healable(plan)) {
    return { blocks: applyPlan(assets.blocks, plan, "fused", fits) };
  }
  const { heal, report } = await planHeal(assets, plan, fits, healDevice, onProgress);
  return { blocks: applyPlan(assets.blocks, plan, "fused", fits, heal), heal: report };
}

/** How an instance decodes: its KV memory and, on WebGPU, its slots. */
export interface EngineOptions {
  /**
   * KV bytes the instance may hold: on the host, live and kept caches together (0 keeps no prefix);
   * on WebGPU the slot pool, preallocated. Default: the device's budget (memory.ts kvBudgetBytes).
   */
  kvBudgetBytes?: number;
  /** On the host, what kept prefixes may hold of kvBudgetBytes (default: all of it). */
  prefixCacheBytes?: number;
  /**
   * Sequences decoding at once: on WebGPU one KV slot each (default 8); on the host the rows a batch
   * keeps room for.
   */
  slots?: number;
  /** WebGPU: replay each batch size's recorded step (graph capture; default on). */
  capture?: boolean;
  /**
   * WebGPU: how decode steps split their float linears' inner dimension (src/onnx/split_k.ts; default
   * DEFAULT_SPLIT_K), or false for steps that run the prefill's graph.
   */
  splitK?: SplitK | false;
  /** Told the KV bytes the engine holds, after each change. */
  onKv?: (bytes: number) => void;
  /**
   * The buffers of helper threads that quantize the build's weights (onnx/convert_pool.ts), started
   * by the caller, which ends them after the build. Without them the build converts in its own thread.
   */
  convert?: HelperBuffers[];
}

/** Sequences a WebGPU instance decodes at once when not told. */
export const DEFAULT_SLOTS = 8;

/**
 * Fuses the weights, builds the graph and creates the sessions and the engine: the whole load-time
 * pipeline. Weights go through `weights`, so that a cache kept across builds spares a later plan every
 * unchanged group.
 */
export async function buildInstance(
  assets: ModelAssets,
  plan: FusionPlan,
  device: Backend,
  options: GraphOptions = FLOAT_WEIGHTS,
  weights: WeightCache = new WeightCache(formatName(options)),
  onProgress?: (stage: string, done: number, total: number) => void,
  serving: EngineOptions = {},
): Promise<ModelInstance> {
  const t0 = performance.now();
  // Healing runs where the instance will: on the GPU a 1B model's passes take seconds, not minutes.
  const { blocks, heal } = await planBlocks(
    assets,
    plan,
    onProgress,
    device === "native-webgpu" ? "wasm" : device,
  );
  const cfg = assets.checkpoint.config;
  const onWebgpu = device === "webgpu";
  // The pool converts a weight of one slice in this thread itself: the caller chose whether helpers pay.
  if (serving.convert?.length) weights.convert = new ConvertPool(serving.convert).convert;
  let graph: DecoderGraph, stepGraph: DecoderGraph;
  try {
    // Host caches are written in place: the MatMul form outputs only each step's own positions.
    graph = buildDecoderGraph(assets.checkpoint, blocks, options, weights, {
      weightsAsInputs: onWebgpu,
      attention: attentionFor(device, options.dtype),
      // WebGPU samples on the GPU (gpu_sampler.ts); a host engine draws from the graph's softmax.
      sampling: samplesInGraph(device, cfg.vocabSize),
    });
    // WebGPU's decode steps run a graph of their own over the same weight buffers.
    const split = serving.splitK ?? DEFAULT_SPLIT_K;
    stepGraph = onWebgpu && split
      ? buildDecoderGraph(assets.checkpoint, blocks, options, weights, { weightsAsInputs: true, step: split })
      : graph;
  } finally {
    weights.convert = convertInline;
  }
  // Nothing split (small or quantized linears): the prefill's graph serves the steps too.
  const step = stepGraph.nodeCount === graph.nodeCount ? graph : stepGraph;
  releaseDecoded();
  const t1 = performance.now();
  const budget = serving.kvBudgetBytes;
  let session: ModelSession | null = null;
  let decoder: SlotDecoder | null = null;
  let engine: Engine;
  if (onWebgpu) {
    const slots = serving.slots ?? DEFAULT_SLOTS;
    const pool = budget ?? kvBudgetBytes(cfg, options, device);
    const perToken = kvBytesPerToken(graph);
    const capacity = perToken
      ? Math.min(cfg.maxPositions, Math.floor(pool / (slots * perToken)))
      : cfg.maxPositions;
    if (capacity < 2) {
      throw new InputError(
        `a KV budget of ${(pool / 2 ** 20).toFixed(1)} MB cannot give ${slots} slots two tokens each ` +
          `(${perToken} bytes a token); raise --kv-cache-mb or lower --max-active`,
        "kv_cache_mb",
      );
    }
    decoder = await SlotDecoder.create(graph, step, cfg.vocabSize, {
      slots,
      capacity,
      buckets: bucketsFor(slots),
      capture: serving.capture ?? true,
    });
    engine = new GpuBatchEngine(
      decoder,
      assets.tokenizer,
      cfg.eosTokenIds,
      cfg.maxPositions,
      serving.onKv,
      (budget ?? 0) > 0,
    );
  } else {
    session = await ModelSession.create(graph, device, cfg.vocabSize);
    engine = new BatchEngine(
      session,
      assets.tokenizer,
      cfg.eosTokenIds,
      cfg.maxPositions,
      serving.onKv,
      budget,
      serving.slots,
      serving.prefixCacheBytes,
    );
  }
  const scorer = session ?? decoder!;
  return {
    plan,
    planId: planId(plan),
    device,
    engine,
    session,
    decoder,
    logitsOf: (ids) => scorer.logitsOf(ids),
    nodeCount: step.nodeCount,
    matmulCount: graph.matmulCount,
    release: async () => {
      await engine.close();
      await scorer.release();
    },
    ffnBlocks: blocks.filter((b) => b.kind === "ffn").length,
    buildMs: performance.now() - t0,
    sessionMs: performance.now() - t1,
    graph: options,
    weightBytes: servedWeightBytes(graph),
    rebuiltBytes: weights.builtBytes,
    reusedBytes: weights.reusedBytes,
    ...(heal ? { heal } : {}),
  };
}
