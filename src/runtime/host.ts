import { UnavailableError } from "../errors.ts";
import { checkPlan, type FusionPlan, planId } from "../fusion/plan.ts";
import { type Checkpoint, loadConfig, modelName } from "../model/checkpoint.ts";
import type { ModelConfig } from "../model/config.ts";
import type { Device } from "./ort.ts";
import { type PendingBuild, type PlanInstance, RemoteInstance } from "./remote_instance.ts";
import { RemoteTokenizer } from "./remote_tokenizer.ts";

/** A counted reference to the instance a request started on; the request keeps it until it ends. */
export interface Lease {
  instance: PlanInstance;
  release(): void;
}

interface Slot {
  instance: PlanInstance;
  users: number;
  retired: boolean;
}

export type HostState = "loading" | "ready" | "failed";

export interface SwapResult {
  instance: PlanInstance;
  swapMs: number;
}

/** How plan instances come to exist; a test gives fakes, the service gives workers. */
export type InstanceBuilder = (
  modelDir: string,
  checkpoint: Checkpoint | null,
  plan: FusionPlan,
  device: Device,
) => PendingBuild;

const workerBuilder: InstanceBuilder = (modelDir, checkpoint, plan, device) =>
  RemoteInstance.build({ modelDir, checkpoint, plan, planId: planId(plan), device });

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
  loadMs = 0;
  swaps = 0;
  /** The loaded weights in shared memory: every later build and the analysis worker reuse them. */
  checkpoint: Checkpoint | null = null;
  private active: Slot | null = null;
  private readonly retiring = new Set<Slot>();
  private pending: PendingBuild | null = null;

  constructor(private readonly builder: InstanceBuilder = workerBuilder) {}

  /** Reads the config, checks the plan against it, then builds the first instance. */
  async load(dir: string, plan: FusionPlan, device: Device, tokenizer?: RemoteTokenizer): Promise<void> {
    const t0 = performance.now();
    try {
      this.device = device;
      this.modelDir = dir;
      this.name = modelName(dir);
      this.config = await loadConfig(dir);
      checkPlan(plan, this.config);
      this.tokenizer = tokenizer ?? await RemoteTokenizer.load(dir);
      const built = await this.builder(dir, null, plan, device).ready;
      this.checkpoint = built.checkpoint;
      this.active = { instance: built.instance, users: 0, retired: false };
      this.loadMs = performance.now() - t0;
      this.state = "ready";
    } catch (e) {
      this.state = "failed";
      this.error = (e as Error).message;
      throw e;
    }
  }

  get instance(): PlanInstance | null {
    return this.active?.instance ?? null;
  }

  /** Old instances kept alive by requests that started before a swap. */
  get retiringCount(): number {
    return this.retiring.size;
  }

  get swapInProgress(): boolean {
    return this.pending !== null;
  }

  private requireReady(): ModelConfig {
    if (this.state === "failed") throw new UnavailableError(`model failed to load: ${this.error}`);
    if (this.state !== "ready" || !this.config) throw new UnavailableError("model is still loading");
    return this.config;
  }

  lease(): Lease {
    this.requireReady();
    const slot = this.active!;
    slot.users++;
    let done = false;
    return {
      instance: slot.instance,
      release: () => {
        if (done) return;
        done = true;
        slot.users--;
        this.freeIfIdle(slot);
      },
    };
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
    const build = this.builder(this.modelDir, this.checkpoint, plan, this.device!);
    this.pending = build;
    try {
      const { instance } = await build.ready;
      const old = this.active;
      this.active = { instance, users: 0, retired: false };
      this.swaps++;
      if (old) {
        old.retired = true;
        this.retiring.add(old);
        this.freeIfIdle(old);
      }
      return { instance, swapMs: performance.now() - t0 };
    } finally {
      if (this.pending === build) this.pending = null;
    }
  }

  private freeIfIdle(slot: Slot): void {
    if (slot.retired && slot.users === 0 && this.retiring.delete(slot)) {
      slot.instance.close().catch((e) => console.error(`closing a retired instance failed: ${e}`));
    }
  }

  async close(): Promise<void> {
    this.pending?.cancel("the service is shutting down");
    await Promise.all([this.active, ...this.retiring].map((s) => s?.instance.close()));
    this.active = null;
    this.retiring.clear();
    this.tokenizer?.close();
  }
}
