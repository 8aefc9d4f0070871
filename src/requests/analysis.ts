import { z } from "zod";
import { InputError } from "../errors.ts";
import { DEFAULT_SUGGEST, type SuggestOptions } from "../fusion/analyze.ts";
import type { TextSlice } from "../fusion/calibration.ts";
import type { Checkpoint } from "../model/checkpoint.ts";
import type { FrontierRequest } from "../instance/plan_scorer.ts";
import type { ModelConfig } from "../model/config.ts";

/**
 * The float64 analysis costs about 2 x layers forward passes over every calibration token, plus one
 * per candidate group: minutes for a few thousand tokens of a small model, so the count is capped.
 */
export const MAX_ANALYSIS_TOKENS = 4096;

/** An analysis request: the body of POST /analysis and the flags of `analyze`. */
export const analysisRequest = z.strictObject({
  max_tokens: z.number().int().min(2).max(MAX_ANALYSIS_TOKENS).default(256).describe("calibration tokens"),
  skip_tokens: z.number().int().min(0).max(1e9).default(0).describe("tokens of the text to pass over first"),
  window: z.number().int().min(2).default(256).describe("tokens per forward pass, at most the context"),
  max_width: z.number().int().min(2).max(64).default(DEFAULT_SUGGEST.maxWidth).describe(
    "largest fused group",
  ),
  threshold: z.number().min(0).max(2).default(DEFAULT_SUGGEST.threshold).describe(
    "largest dependency in a group",
  ),
  remove_steps: z.number().int().min(0).max(32).default(0).describe(
    "also measure the speed/quality frontier up to this many sequential steps removed (attention removed or linear, FFNs fused)",
  ),
  max_loss_increase: z.number().min(0).max(1000).optional().describe(
    "perplexity budget in percent for the frontier's suggested plan",
  ),
});

export type AnalysisRequest = z.infer<typeof analysisRequest>;

/** The limits that depend on the model, checked before any work starts. */
export function checkAnalysisRequest(req: { window: number }, config: ModelConfig): void {
  if (req.window > config.maxPositions) {
    throw new InputError(
      `${req.window} exceeds the model's context of ${config.maxPositions} tokens`,
      "window",
    );
  }
}

/** What the analysis worker is given (POST /analysis). */
export interface AnalysisJob {
  checkpoint: Checkpoint;
  modelDir: string;
  textPath: string;
  slice: TextSlice;
  suggest: SuggestOptions;
  /** Also measure the speed/quality frontier (sessions built here, in this worker). */
  frontier?: FrontierRequest;
}
