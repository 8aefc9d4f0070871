import { InputError } from "../errors.ts";

/** A prompt must leave room for at least one generated token inside the context window. */
export function checkPromptFits(promptTokens: number, maxPositions: number, field = "prompt"): void {
  if (promptTokens === 0) throw new InputError("encodes to no tokens", field);
  if (promptTokens >= maxPositions) {
    throw new InputError(
      `${promptTokens} tokens; the context window is ${maxPositions} (at most ${
        maxPositions - 1
      } prompt tokens)`,
      field,
    );
  }
}
