import { applyPlan } from "../fusion/apply.ts";
import { textWindows } from "../fusion/calibration.ts";
import { evaluateQuality, type Scorer } from "../fusion/evaluate.ts";
import { type FrontierResult, planForBudget, type PlanScore, searchFrontier } from "../fusion/frontier.ts";
import { FIT_SLICE, fitLinearAttention } from "../fusion/linear_fit.ts";
import { type FusionPlan, UNFUSED } from "../fusion/plan.ts";
import { unfusedBlocks } from "../model/blocks.ts";
import type { Checkpoint } from "../model/checkpoint.ts";
import type { TextTokenizer } from "../model/tokenizer.ts";
import type { Device } from "../ort/ort.ts";
import { type ModelSession, withScoringSession } from "../ort/session.ts";

/** Held-out tokens each candidate plan is measured on. */
export const HELD_OUT_TOKENS = 256;

export interface FrontierRequest {
  /** Block-parallel candidates to measure (blockCandidates of the dependency analysis). */
  blockGroups?: number[][];
  /** The largest number of sequential steps to remove. */
  steps: number;
  /** A perplexity budget in percent for the suggested plan. */
  maxLossIncrease?: number;
  maxWidth: number;
  /** Where candidates are scored: the serving device (WASM when absent). */
  device?: Device;
}

/** Scores plans on held-out text; `unfused` is the model's own loss and perplexity there. */
export interface PlanScorer {
  score(plan: FusionPlan): Promise<PlanScore>;
  unfused: { loss: number; ppl: number };
  heldOutTokens: number;
}

/**
 * Measures plans through onnxruntime on `device` (WASM by default), fp32: each candidate gets
 * a session, its held-out loss, and KL and top-1 agreement against the unfused model's logits.
 * Linear attentions are fitted once per layer on the calibration text and shared by every plan.
 */
export async function planScorer(
  ckpt: Checkpoint,
  tokenizer: TextTokenizer,
  textPath: string,
  calibration: { skip: number; max: number },
  device: Device = "wasm",
): Promise<PlanScorer> {
  const cfg = ckpt.config;
  const window = Math.min(128, cfg.maxPositions);
  // Held out from both the analysis's calibration tokens and the tokens the linear maps are fitted on.
  const heldOut = await textWindows(textPath, tokenizer, {
    skip: Math.max(calibration.skip + calibration.max, FIT_SLICE.skip + FIT_SLICE.max),
    max: HELD_OUT_TOKENS,
    window,
  });
  const fitWindows = await textWindows(textPath, tokenizer, { ...FIT_SLICE, window });
  const candidates = cfg.layers.flatMap((l, i) => (l.attention.kind === "full" ? [i] : []));
  const fits = fitLinearAttention(ckpt, candidates, fitWindows);
  const blocks = unfusedBlocks(ckpt);
  const withPlan = <T>(plan: FusionPlan, use: (s: ModelSession) => Promise<T>) =>
    withScoringSession(ckpt, applyPlan(blocks, plan, "fused", fits), use, device);
  const baseLogits = new Map<number[], Float32Array | Float64Array>();
  await withPlan(UNFUSED, async (base) => {
    for (const ids of heldOut) baseLogits.set(ids, await base.logitsOf(ids));
  });
  const baseline: Scorer = (ids) => Promise.resolve(baseLogits.get(ids)!);
  const unfused = await evaluateQuality(heldOut, cfg.vocabSize, baseline);
  return {
    unfused: { loss: unfused.loss, ppl: unfused.ppl },
    heldOutTokens: unfused.tokens,
    score: (plan) =>
      withPlan(
        plan,
        async (s) =>
          await evaluateQuality(heldOut, cfg.vocabSize, (ids) => s.logitsOf(ids), baseline) as PlanScore,
      ),
  };
}

/** The frontier search (searchFrontier) scored by planScorer, with the plan the budget allows. */
export async function frontierFromText(
  ckpt: Checkpoint,
  tokenizer: TextTokenizer,
  textPath: string,
  calibration: { skip: number; max: number },
  req: FrontierRequest,
  onProgress?: (done: number, total: number) => void,
): Promise<FrontierResult> {
  const scorer = await planScorer(ckpt, tokenizer, textPath, calibration, req.device);
  const report = await searchFrontier(
    ckpt.config,
    { maxSteps: req.steps, maxWidth: req.maxWidth, blockGroups: req.blockGroups },
    scorer.score,
    scorer.unfused,
    onProgress,
  );
  const chosen = planForBudget(report, { steps: req.steps, maxLossIncrease: req.maxLossIncrease });
  return { ...report, budget_plan: chosen?.plan ?? null, held_out_tokens: scorer.heldOutTokens };
}
