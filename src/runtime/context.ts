import { InputError } from "../errors.ts";

/** A prompt must leave room for at least one generated token inside the context window. */
export function checkPromptFits(promptTokens: number, maxPositions: number): void {
  if (promptTokens === 0) throw new InputError("prompt encodes to no tokens");
  if (promptTokens >= maxPositions) {
    throw new InputError(
      `prompt is ${promptTokens} tokens; the context window is ${maxPositions} (at most ${
        maxPositions - 1
      } prompt tokens)`,
    );
  }
}
