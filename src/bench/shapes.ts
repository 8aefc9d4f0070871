import { fusableRuns } from "../fusion/plan.ts";
import { type Block, type FfnBlock, unfusedBlocks } from "../model/blocks.ts";
import { type Checkpoint, modelName } from "../model/checkpoint.ts";
import { tensor } from "../model/tensor.ts";
import { rng } from "../numeric.ts";

/** FFN shapes of common models: hidden x intermediate. */
export const PRESETS = {
  "tiny-nas": { d: 256, n: 768 },
  "llama-1b": { d: 2048, n: 8192 },
  "llama-8b": { d: 4096, n: 14336 },
} as const;

export type PresetName = keyof typeof PRESETS;

export interface FfnRun {
  source: string;
  d: number;
  eps: number;
  layers: number[];
  blocks: FfnBlock[];
}

/** k random SwiGLU layers of a preset shape (weights scaled like trained ones, gains near 1). */
export function presetRun(name: PresetName, k: number, seed = 1): FfnRun {
  const { d, n } = PRESETS[name];
  const r = rng(seed);
  const normal = () => Math.sqrt(-2 * Math.log(Math.max(r(), 1e-12))) * Math.cos(2 * Math.PI * r());
  const rand = (count: number, scale: number) => Float32Array.from({ length: count }, () => normal() * scale);
  const blocks = Array.from({ length: k }, (_, i): FfnBlock => ({
    kind: "ffn",
    layers: [i],
    norm: Float32Array.from({ length: d }, () => 1 + 0.1 * normal()),
    gate: tensor([n, d], rand(n * d, 1 / Math.sqrt(d))),
    up: tensor([n, d], rand(n * d, 1 / Math.sqrt(d))),
    down: tensor([d, n], rand(d * n, 1 / Math.sqrt(n))),
  }));
  return { source: `preset ${name}`, d, eps: 1e-5, layers: blocks.map((_, i) => i), blocks };
}

/**
 * k consecutive FFN layers of a checkpoint: from its first attention-free run when it has one this
 * long (the layers a plan would fuse), otherwise its first k layers (the same work either way).
 */
export function checkpointRun(ckpt: Checkpoint, k: number): FfnRun {
  const run = fusableRuns(ckpt.config).find((r) => r.length >= k);
  const layers = run ? run.slice(run.length - k) : Array.from({ length: k }, (_, i) => i);
  const blocks = unfusedBlocks(ckpt);
  const ffn = layers.map((l) =>
    blocks.find((b: Block) => b.kind === "ffn" && b.layers[0] === l) as FfnBlock | undefined
  );
  if (ffn.some((b) => !b)) throw new Error(`layers ${layers} do not all have SwiGLU FFNs`);
  return {
    source: `${modelName(ckpt.dir)} layers ${layers[0]}..${layers.at(-1)}`,
    d: ckpt.config.hidden,
    eps: ckpt.config.rmsEps,
    layers,
    blocks: ffn as FfnBlock[],
  };
}
