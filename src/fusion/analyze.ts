import { InputError } from "../errors.ts";
import type { Block } from "../model/blocks.ts";
import { type Checkpoint, modelName } from "../model/checkpoint.ts";
import type { ModelConfig } from "../model/config.ts";
import { referenceForward } from "../model/forward.ts";
import { applyPlan } from "./apply.ts";
import { evaluateQuality } from "./evaluate.ts";
import { fusableRuns, type FusionPlan, planId } from "./plan.ts";
import { type TextSlice, textWindows } from "./calibration.ts";
import type { TextTokenizer } from "../model/tokenizer.ts";
import { unfusedBlocks } from "../model/blocks.ts";

export interface BlockLabel {
  index: number;
  kind: "attention" | "ffn" | "linear";
  layer: number;
  label: string;
}

export interface DependencyAnalysis {
  blocks: BlockLabel[];
  /**
   * M[i][j], j > i: mean over tokens of the cosine distance between block j's contribution
   * f_j(x) - x with block i present and with block i removed. 0 on and below the diagonal.
   */
  matrix: number[][];
  /** Per block: mean over tokens of ||f(x) - x|| / ||x||, how much the block changes the stream. */
  ratios: number[];
  tokens: number;
}

export function labelBlocks(blocks: Block[]): BlockLabel[] {
  return blocks.map((b, index) => {
    if (b.kind === "attention") return { index, kind: "attention", layer: b.layer, label: `attn ${b.layer}` };
    if (b.kind === "linear") {
      return {
        index,
        kind: "linear",
        layer: b.layer,
        label: `${b.part === "attention" ? "attn" : "ffn"}-linear ${b.layer}`,
      };
    }
    if (b.kind === "ffn" && b.layers.length === 1) {
      return { index, kind: "ffn", layer: b.layers[0], label: `ffn ${b.layers[0]}` };
    }
    if (b.kind === "parallel_blocks") {
      // A checkpoint that was block-parallelised already (NVIDIA's parallel_blocks): its blocks have no
      // sequential order left to measure dependencies along.
      throw new InputError(
        "the dependency analysis measures sequential blocks; this checkpoint has parallel blocks " +
          "(block_configs[].parallel_blocks)",
        "model",
      );
    }
    throw new Error("analysis runs on the unfused model");
  });
}

/** Mean over rows of 1 - cos(a_t, b_t); rows where either side is zero count as distance 0. */
function meanCosineDistance(a: Float64Array, b: Float64Array, rows: number, width: number): number {
  let total = 0;
  for (let r = 0; r < rows; r++) {
    let dot = 0;
    let na = 0;
    let nb = 0;
    for (let i = r * width; i < (r + 1) * width; i++) {
      dot += a[i] * b[i];
      na += a[i] * a[i];
      nb += b[i] * b[i];
    }
    if (na > 0 && nb > 0) total += 1 - dot / Math.sqrt(na * nb);
  }
  return total / rows;
}

export type Progress = (done: number, total: number) => void;

/**
 * The paper's block dependency matrix on calibration sequences, with the float64 reference forward.
 * Each removal pass resumes from the recorded input of the removed block, so it only recomputes
 * the blocks after it.
 */
export function dependencyMatrix(
  ckpt: Checkpoint,
  blocks: Block[],
  sequences: number[][],
  onProgress?: Progress,
): DependencyAnalysis {
  const n = blocks.length;
  const d = ckpt.config.hidden;
  const matrix = Array.from({ length: n }, () => new Array<number>(n).fill(0));
  const ratios = new Array<number>(n).fill(0);
  let tokens = 0;
  const total = sequences.length * (n + 1);
  let done = 0;
  for (const ids of sequences) {
    const t = ids.length;
    const inputs: Float64Array[] = [];
    const deltas: Float64Array[] = [];
    referenceForward(ckpt, blocks, ids, {
      logits: "none",
      onDelta: (j, delta, x) => {
        inputs[j] = x;
        deltas[j] = delta;
        for (let r = 0; r < t; r++) {
          let nd = 0;
          let nx = 0;
          for (let k = r * d; k < (r + 1) * d; k++) {
            nd += delta[k] * delta[k];
            nx += x[k] * x[k];
          }
          ratios[j] += Math.sqrt(nd) / Math.max(Math.sqrt(nx), 1e-30);
        }
      },
    });
    onProgress?.(++done, total);
    for (let i = 0; i < n; i++) {
      referenceForward(ckpt, blocks, ids, {
        logits: "none",
        skipBlock: i,
        start: { block: i, x: inputs[i] },
        onDelta: (j, delta) => {
          matrix[i][j] += meanCosineDistance(deltas[j], delta, t, d) * t;
        },
      });
      onProgress?.(++done, total);
    }
    tokens += t;
  }
  return {
    blocks: labelBlocks(blocks),
    matrix: matrix.map((row) => row.map((v) => v / tokens)),
    ratios: ratios.map((v) => v / tokens),
    tokens,
  };
}

export interface SuggestOptions {
  /** Largest group (layers per fused FFN). */
  maxWidth: number;
  /** Largest dependency M[ffn a][ffn b] allowed between two members of a group. */
  threshold: number;
}

/** Greedy grouping: extend a group while every pairwise FFN dependency stays under the threshold. */
export function groupRuns(
  analysis: DependencyAnalysis,
  config: ModelConfig,
  opts: SuggestOptions,
): number[][] {
  const ffnBlock = new Map<number, number>();
  for (const b of analysis.blocks) if (b.kind === "ffn") ffnBlock.set(b.layer, b.index);
  const dep = (a: number, b: number) => analysis.matrix[ffnBlock.get(a)!][ffnBlock.get(b)!];
  const groups: number[][] = [];
  for (const run of fusableRuns(config)) {
    let group: number[] = [run[0]];
    for (const layer of run.slice(1)) {
      const fits = group.length < opts.maxWidth && group.every((m) => dep(m, layer) <= opts.threshold);
      if (fits) group.push(layer);
      else {
        if (group.length >= 2) groups.push(group);
        group = [layer];
      }
    }
    if (group.length >= 2) groups.push(group);
  }
  return groups;
}

export interface PlanTrial {
  plan: FusionPlan;
  id: string;
  loss: number;
}

/**
 * The suggested plan: the greedy groups, then for each group of three or more, whether leaving its
 * last FFN out lowers the measured loss (the paper finds a run's final FFN the most dependent).
 */
export async function suggestPlan(
  analysis: DependencyAnalysis,
  config: ModelConfig,
  opts: SuggestOptions,
  lossOf: (plan: FusionPlan) => Promise<number>,
): Promise<{ plan: FusionPlan; trials: PlanTrial[] }> {
  const trials: PlanTrial[] = [];
  const measure = async (groups: number[][]) => {
    const plan: FusionPlan = { version: 1, ffn_groups: groups };
    const id = planId(plan);
    const seen = trials.find((t) => t.id === id);
    if (seen) return seen.loss;
    const loss = await lossOf(plan);
    trials.push({ plan, id, loss });
    return loss;
  };
  let groups = groupRuns(analysis, config, opts);
  let best = await measure(groups);
  for (let g = 0; g < groups.length; g++) {
    if (groups[g].length < 3) continue;
    const trimmed = groups.map((x, k) => (k === g ? x.slice(0, -1) : x));
    const loss = await measure(trimmed);
    if (loss < best) {
      best = loss;
      groups = trimmed;
    }
  }
  return { plan: { version: 1, ffn_groups: groups }, trials };
}

/** Mean next-token negative log-likelihood of the float64 reference under a block list. */
export async function referenceLoss(
  ckpt: Checkpoint,
  blocks: Block[],
  sequences: number[][],
): Promise<number> {
  const scorer = (ids: number[]) => Promise.resolve(referenceForward(ckpt, blocks, ids).logits);
  return (await evaluateQuality(sequences, ckpt.config.vocabSize, scorer)).loss;
}

export interface AnalysisReport {
  model: string;
  analysis: DependencyAnalysis;
  runs: number[][];
  options: SuggestOptions;
  suggested_plan: FusionPlan;
  trials: PlanTrial[];
  unfused_loss: number;
}

export const DEFAULT_SUGGEST: SuggestOptions = { maxWidth: 4, threshold: 0.2 };

/** The whole `analyze`: dependency matrix, ratios and a loss-checked suggested plan. */
export async function analyzeModel(
  ckpt: Checkpoint,
  blocks: Block[],
  sequences: number[][],
  opts: SuggestOptions,
  onProgress?: Progress,
): Promise<AnalysisReport> {
  const analysis = dependencyMatrix(ckpt, blocks, sequences, onProgress);
  const unfusedLoss = await referenceLoss(ckpt, blocks, sequences);
  const { plan, trials } = await suggestPlan(
    analysis,
    ckpt.config,
    opts,
    (p) => referenceLoss(ckpt, applyPlan(blocks, p), sequences),
  );
  return {
    model: modelName(ckpt.dir),
    analysis,
    runs: fusableRuns(ckpt.config),
    options: opts,
    suggested_plan: plan,
    trials,
    unfused_loss: unfusedLoss,
  };
}

/** The analysis pipeline of `analyze` and of the server's analysis worker: text in, report out. */
export async function analyzeText(
  ckpt: Checkpoint,
  tokenizer: TextTokenizer,
  textPath: string,
  slice: TextSlice,
  opts: SuggestOptions,
  onProgress?: Progress,
): Promise<AnalysisReport> {
  const sequences = await textWindows(textPath, tokenizer, slice);
  return await analyzeModel(ckpt, unfusedBlocks(ckpt), sequences, opts, onProgress);
}
