import { InputError, UnavailableError } from "../errors.ts";
import { checkPlan, type FusionPlan, planId, UNFUSED } from "../fusion/plan.ts";
import { type Checkpoint, loadConfig, modelName } from "../model/checkpoint.ts";
import type { ModelConfig } from "../model/config.ts";
import { FLOAT_WEIGHTS, type GraphOptions } from "../onnx/format.ts";
import { checkModelFits, kvBudgetBytes, prefixCacheBytes } from "../ort/memory.ts";
import { quantizesWide } from "../onnx/quantize.ts";
import type { Device } from "../ort/ort.ts";
import { WeightStore } from "../onnx/weight_cache.ts";
import {
  type BuildProgress,
  type BuildSpec,
  type PendingBuild,
  type PlanInstance,
  RemoteInstance,
} from "../instance/remote_instance.ts";
import { RemoteTokenizer, type TokenizerOptions } from "./remote_tokenizer.ts";

/** A counted reference to the instance a request started on; the request keeps it until it ends. */
export interface Lease {
  instance: PlanInstance;
  release(): void;
}

interface Slot {
  instance: PlanInstance;
  users: number;
  retired: boolean;
  /** The converted weights its graph uses (kept while the slot lives). */
  weightKeys: string[];
}

export type HostState = "loading" | "ready" | "failed";

/** The unfused reference instance: its build while it runs, then its slot. */
interface Reference {
  slot: Promise<Slot>;
  build: PendingBuild | null;
  ready: Slot | null;
  idle?: ReturnType<typeof setTimeout>;
}

export interface SwapResult {
  instance: PlanInstance;
  swapMs: number;
  /** Weight bytes the swap converted (the groups that changed) and reused from earlier plans. */
  rebuiltBytes: number;
  reusedBytes: number;
}

/** How plan instances come to exist; a test gives fakes, the service gives workers. */
export type InstanceBuilder = (spec: BuildSpec) => PendingBuild;

const workerBuilder: InstanceBuilder = (spec) => RemoteInstance.build(spec);

/** How the served model is loaded: weight format, context cap, and how much it must hold at once. */
export interface HostOptions {
  graph: GraphOptions;
  maxContext?: number;
  /** The KV-cache budget in MB (--kv-cache-mb); a default from the device when absent. */
  kvCacheMb?: number;
  /** What finished sequences kept for prefix reuse may hold, in MB (--prefix-cache-mb; host devices). */
  prefixCacheMb?: number;
  /** The WebGPU adapter's largest buffer, when known. */
  maxBufferBytes?: number;
  /** Text the linear attentions of version 2 plans are fitted on. */
  calibrationText?: string;
  /** The chat template's source and limits, and how messages' special-token text is read. */
  chat?: TokenizerOptions;
  /** onnxruntime's threads per plan instance (`--threads`; the device's default when absent). */
  threads?: number;
  /** Sequences decoding at once (`--max-active`; EngineOptions.slots). */
  slots?: number;
}

/**
 * Threads a build quantizes on: every core before the server is ready; half of them once it serves,
 * so that a swap's build leaves the streams of the live instance cores to decode on.
 */
function convertThreads(serving: boolean): number {
  const cores = navigator.hardwareConcurrency || 1;
  return serving ? Math.max(1, Math.floor(cores / 2)) : cores;
}

/**
 * Owns the served model. Requests lease the active instance; a plan swap builds the new instance in
 * its own worker while the old one keeps serving, switches atomically, and frees the old one when
 * its last lease ends. One build at a time: a newer swap supersedes a pending one.
 */
export class ModelHost {
  state: HostState = "loading";
  error: string | null = null;
  config: ModelConfig | null = null;
  tokenizer: RemoteTokenizer | null = null;
  name = "";
  modelDir = "";
  device: Device | null = null;
  /** How every plan's graph stores its weights (quantization); fixed for the process. */
  graph: GraphOptions = FLOAT_WEIGHTS;
  loadMs = 0;
  swaps = 0;
  /** What admission keeps the KV caches of all sequences within (see Scheduler.reserveKv). */
  kvBudgetBytes = 0;
  /** On the host, what of it kept prefixes may hold (memory.ts prefixCacheBytes); null on WebGPU (its slots). */
  prefixCacheBytes: number | null = null;
  /** The loaded checkpoint (file-backed): every later build and background job reads its weights from it. */
  checkpoint: Checkpoint | null = null;
  /**
   * Converted weights (transposed, fused, fp16, quantized) of the live instances, as files: a swap
   * converts only the groups its plan changes. Entries no live instance uses are deleted.
   */
  private readonly weights = new WeightStore();
  /** Text a version 2 plan's linear attentions are fitted on (`--calibration`). */
  calibrationText?: string;
  private threads?: number;
  private slots?: number;
  private active: Slot | null = null;
  private readonly retiring = new Set<Slot>();
  private pending: PendingBuild | null = null;
  /**
   * The unfused model beside a fused active plan, for side-by-side comparisons (the dashboard's
   * playground): built on first use in a worker of its own, closed after an idle minute or when a
   * swap makes the active plan unfused.
   */
  private reference: Reference | null = null;
  /** How long the unfused reference stays after its last lease ends. */
  referenceIdleMs = 60_000;

  constructor(private readonly builder: InstanceBuilder = workerBuilder) {}

  /** Reads the config, checks the plan against it, then builds the first instance. */
  async load(
    dir: string,
    plan: FusionPlan,
    device: Device,
    opts: HostOptions = { graph: FLOAT_WEIGHTS },
    tokenizer?: RemoteTokenizer,
  ): Promise<void> {
    const t0 = performance.now();
    try {
      this.device = device;
      this.graph = opts.graph;
      this.calibrationText = opts.calibrationText;
      this.threads = opts.threads;
      this.slots = opts.slots;
      this.modelDir = dir;
      this.name = modelName(dir);
      this.config = await loadConfig(dir, { maxContext: opts.maxContext });
      checkPlan(plan, this.config);
      checkModelFits(this.config, opts.graph, device, { sequences: 1, maxBufferBytes: opts.maxBufferBytes });
      this.kvBudgetBytes = kvBudgetBytes(this.config, opts.graph, device, opts.kvCacheMb);
      if (device === "webgpu" && opts.prefixCacheMb !== undefined) {
        throw new InputError(
          "it sizes what the host devices (cpu, wasm) keep of finished sequences; on webgpu they stay in their " +
            "slots until another needs one (size those with --kv-cache-mb and --max-active)",
          "prefix_cache_mb",
        );
      }
      this.prefixCacheBytes = device === "webgpu"
        ? null
        : prefixCacheBytes(this.config, opts.graph, this.kvBudgetBytes, opts.prefixCacheMb);
      this.tokenizer = tokenizer ?? await RemoteTokenizer.load(dir, opts.chat);
      const spec = this.spec(null, plan, opts.maxContext);
      const built = await this.built(spec, this.builder(spec));
      this.checkpoint = built.checkpoint;
      this.active = this.keep(built);
      this.loadMs = performance.now() - t0;
      this.state = "ready";
    } catch (e) {
      this.state = "failed";
      this.error = (e as Error).message;
      throw e;
    }
  }

  private spec(checkpoint: Checkpoint | null, plan: FusionPlan, maxContext?: number): BuildSpec {
    return {
      modelDir: this.modelDir,
      checkpoint,
      plan,
      planId: planId(plan),
      device: this.device!,
      graph: this.graph,
      maxContext,
      weights: this.weights.entries,
      weightDir: this.weights.buildDir(),
      calibrationText: this.calibrationText,
      kvBudgetBytes: this.kvBudgetBytes,
      prefixCacheBytes: this.prefixCacheBytes ?? undefined,
      threads: this.threads,
      slots: this.slots,
      convertThreads: quantizesWide(this.config!, this.graph) ? convertThreads(this.active !== null) : 1,
    };
  }

  /** The build's result; a build that fails or is cancelled leaves none of the weights it wrote. */
  private async built(spec: BuildSpec, build: PendingBuild): Promise<Awaited<PendingBuild["ready"]>> {
    try {
      return await build.ready;
    } catch (e) {
      this.weights.discard(spec.weightDir);
      throw e;
    }
  }

  /** A new slot for a built instance; the weights it converted join the cache. */
  private keep(built: Awaited<PendingBuild["ready"]>): Slot {
    this.weights.add(built.weights.added);
    return { instance: built.instance, users: 0, retired: false, weightKeys: built.weights.keys };
  }

  /** Bytes of converted weights kept for reuse. */
  get weightCacheBytes(): number {
    return this.weights.bytes;
  }

  /** Drops converted weights that no live instance uses. */
  private pruneWeights(): void {
    // A pending build reads entries of earlier builds from their files until its session holds them:
    // nothing is deleted under it. Its end prunes instead (swap).
    if (this.pending || this.reference?.build) return;
    const live = new Set(
      [this.active, ...this.retiring, this.reference?.ready].flatMap((s) => s?.weightKeys ?? []),
    );
    this.weights.keepOnly(live).catch((e) => console.error(`deleting unused weights failed: ${e}`));
  }

  get instance(): PlanInstance | null {
    return this.active?.instance ?? null;
  }

  /** Old instances kept alive by requests that started before a swap. */
  get retiringCount(): number {
    return this.retiring.size;
  }

  /** KV bytes the live instances hold now (their batches and the prompts they are prefilling). */
  get kvBytes(): number {
    return [this.active, ...this.retiring, this.reference?.ready]
      .reduce((n, s) => n + (s?.instance.kvBytes ?? 0), 0);
  }

  /** Plan instances alive (each a worker with its own session): active, retiring and being built. */
  get liveInstances(): number {
    return (this.active ? 1 : 0) + this.retiring.size + (this.pending ? 1 : 0) + (this.reference ? 1 : 0);
  }

  get swapInProgress(): boolean {
    return this.pending !== null;
  }

  /** The stage a pending build reports (healing), null when none does. */
  get buildProgress(): BuildProgress | null {
    return this.pending?.progress ?? null;
  }

  /** The model's config once it serves; an UnavailableError while loading or after a failed load. */
  requireReady(): ModelConfig {
    if (this.state === "failed") throw new UnavailableError(`model failed to load: ${this.error}`);
    if (this.state !== "ready" || !this.config) throw new UnavailableError("model is still loading");
    return this.config;
  }

  lease(): Lease {
    this.requireReady();
    const slot = this.active!;
    return this.leaseOf(slot, () => this.freeIfIdle(slot));
  }

  private leaseOf(slot: Slot, idle: () => void): Lease {
    slot.users++;
    let done = false;
    return {
      instance: slot.instance,
      release: () => {
        if (done) return;
        done = true;
        slot.users--;
        if (slot.users === 0) idle();
      },
    };
  }

  /**
   * The unfused model, to compare the active plan against: the active instance itself when its plan
   * is unfused, else the reference instance (built now if there is none; the first call waits for
   * its build). Refused while loading, and when the machine lacks the memory for a second copy.
   */
  async leaseUnfused(): Promise<Lease> {
    this.requireReady();
    if (this.active!.instance.planId === planId(UNFUSED)) return this.lease();
    if (!this.reference) {
      this.checkRoomForReference();
      const spec = this.spec(this.checkpoint, UNFUSED);
      // It keeps no prefixes for reuse (a budget of 0), except on WebGPU, where the budget is its slots.
      const build = this.builder(this.device === "webgpu" ? spec : { ...spec, kvBudgetBytes: 0 });
      const reference: Reference = {
        build,
        ready: null,
        slot: this.built(spec, build).then((built) => {
          reference.build = null;
          return reference.ready = this.keep(built);
        }),
      };
      reference.slot.catch(() => {
        if (this.reference === reference) this.reference = null;
      });
      this.reference = reference;
    }
    const reference = this.reference;
    const slot = await reference.slot;
    clearTimeout(reference.idle);
    return this.leaseOf(slot, () => {
      if (slot.retired) this.freeIfIdle(slot);
      else reference.idle = setTimeout(() => this.closeReference(reference), this.referenceIdleMs);
    });
  }

  /** A second copy of the weights must fit beside the first in the memory the machine has free. */
  private checkRoomForReference(): void {
    const need = this.active!.instance.weightBytes * 1.5;
    const free = Deno.systemMemoryInfo().available;
    if (free < need) {
      throw new UnavailableError(
        `the unfused model needs about ${(need / 2 ** 20).toFixed(0)} MB beside the active plan and ` +
          `${(free / 2 ** 20).toFixed(0)} MB are free`,
      );
    }
  }

  private closeReference(reference: Reference): void {
    if (this.reference !== reference) return;
    this.reference = null;
    clearTimeout(reference.idle);
    reference.build?.cancel("the unfused reference is no longer needed");
    reference.slot.then((slot) => {
      slot.retired = true;
      this.retiring.add(slot);
      this.freeIfIdle(slot);
    }, () => {});
  }

  /**
   * Checks the plan against the model (an invalid plan leaves the active one untouched), builds it
   * in the background and swaps it in. A newer swap cancels this one's build: this call then fails
   * with a BusyError, and the newer plan is the one that lands.
   */
  async swap(plan: FusionPlan): Promise<SwapResult> {
    checkPlan(plan, this.requireReady());
    const t0 = performance.now();
    this.pending?.cancel(`superseded by a newer plan (${planId(plan)}) before its build finished`);
    const spec = this.spec(this.checkpoint, plan);
    const build = this.builder(spec);
    this.pending = build;
    try {
      const built = await this.built(spec, build);
      const old = this.active;
      this.active = this.keep(built);
      this.swaps++;
      if (this.reference && built.instance.planId === planId(UNFUSED)) this.closeReference(this.reference);
      if (old) {
        old.retired = true;
        this.retiring.add(old);
      }
      const { rebuiltBytes, reusedBytes } = built.weights;
      return { instance: built.instance, swapMs: performance.now() - t0, rebuiltBytes, reusedBytes };
    } finally {
      if (this.pending === build) {
        this.pending = null;
        for (const slot of [...this.retiring]) this.freeIfIdle(slot);
        this.pruneWeights();
      }
    }
  }

  private freeIfIdle(slot: Slot): void {
    if (slot.retired && slot.users === 0 && this.retiring.delete(slot)) {
      this.pruneWeights();
      slot.instance.close().catch((e) => console.error(`closing a retired instance failed: ${e}`));
    }
  }

  async close(): Promise<void> {
    this.pending?.cancel("the service is shutting down");
    const reference = this.reference;
    this.reference = null;
    clearTimeout(reference?.idle);
    reference?.build?.cancel("the service is shutting down");
    await Promise.all([this.active, ...this.retiring, reference?.ready].map((s) => s?.instance.close()));
    this.active = null;
    this.retiring.clear();
    this.weights.close();
    this.tokenizer?.close();
  }
}
