import { InputError } from "../errors.ts";
import { type FusionPlan, validatePlan } from "../fusion/plan.ts";
import { buildInstance, loadAssets, type ModelAssets, type ModelInstance } from "./engine.ts";
import type { Device } from "./ort.ts";

/** A counted reference to the instance a request started on; the request keeps it until it ends. */
export interface Lease {
  instance: ModelInstance;
  release(): void;
}

interface Slot {
  instance: ModelInstance;
  users: number;
  retired: boolean;
  freed: boolean;
}

export type HostState = "loading" | "ready" | "failed";

/**
 * Owns the served model. Requests lease the active instance; a plan swap builds the new instance
 * while the old one keeps serving, switches atomically, and frees the old one when its last lease ends.
 */
export class ModelHost {
  state: HostState = "loading";
  /** Set on shutdown: /health turns 503 so load balancers stop routing here while streams drain. */
  draining = false;
  error: string | null = null;
  assets: ModelAssets | null = null;
  device: Device | null = null;
  loadMs = 0;
  swaps = 0;
  private active: Slot | null = null;
  /** Replaced instances still finishing requests; freed when their last lease ends. */
  private retiring = new Set<Slot>();
  private swapping: Promise<ModelInstance> | null = null;

  async load(dir: string, plan: unknown, device: Device): Promise<void> {
    const t0 = performance.now();
    try {
      this.device = device;
      this.assets = await loadAssets(dir);
      const valid = validatePlan(plan, this.assets.checkpoint.config);
      this.active = {
        instance: await buildInstance(this.assets, valid, device),
        users: 0,
        retired: false,
        freed: false,
      };
      this.loadMs = performance.now() - t0;
      this.state = "ready";
    } catch (e) {
      this.state = "failed";
      this.error = (e as Error).message;
      throw e;
    }
  }

  get instance(): ModelInstance | null {
    return this.active?.instance ?? null;
  }

  /** Old instances kept alive by requests that started before a swap. */
  get retiringCount(): number {
    return this.retiring.size;
  }

  get swapInProgress(): boolean {
    return this.swapping !== null;
  }

  lease(): Lease {
    const slot = this.active;
    if (this.state !== "ready" || !slot) throw new InputError("model is not loaded yet", 409);
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
   * Validates and applies a plan. The plan is checked before anything is built, so a bad plan
   * leaves the active one untouched; one swap runs at a time.
   */
  async swap(raw: unknown): Promise<ModelInstance> {
    if (this.state !== "ready" || !this.assets || !this.device) {
      throw new InputError("model is not loaded yet", 409);
    }
    const plan: FusionPlan = validatePlan(raw, this.assets.checkpoint.config);
    if (this.swapping) throw new InputError("a plan swap is already in progress", 409);
    const build = buildInstance(this.assets, plan, this.device);
    this.swapping = build;
    try {
      const instance = await build;
      const old = this.active;
      this.active = { instance, users: 0, retired: false, freed: false };
      this.swaps++;
      if (old) {
        old.retired = true;
        this.retiring.add(old);
        this.freeIfIdle(old);
      }
      return instance;
    } finally {
      this.swapping = null;
    }
  }

  private freeIfIdle(slot: Slot): void {
    if (slot.retired && slot.users === 0 && !slot.freed) {
      slot.freed = true;
      this.retiring.delete(slot);
      slot.instance.session.release().catch((e) => console.error(`releasing session failed: ${e}`));
    }
  }

  async close(): Promise<void> {
    if (this.active) await this.active.instance.session.release();
    this.active = null;
  }
}
