import { InputError } from "../errors.ts";
import type { TextTokenizer } from "../model/tokenizer.ts";
import { windows } from "./evaluate.ts";

export interface TextSlice {
  /** Tokens to pass over first (keeps calibration and evaluation text apart). */
  skip: number;
  max: number;
  /** Window length; capped by the model's context. */
  window: number;
}

/** Tokenizes a text file and cuts [skip, skip + max) of it into context-sized windows. */
export async function textWindows(
  path: string,
  tokenizer: TextTokenizer,
  slice: TextSlice,
): Promise<number[][]> {
  const [seqs] = await textSlices(path, tokenizer, [slice]);
  if (seqs.length === 0) {
    throw new InputError(`text ${path}: fewer than 2 tokens after skipping ${slice.skip}`);
  }
  return seqs;
}

/** Several slices of one text file, tokenized once; a slice past the text's end has no windows. */
export async function textSlices(
  path: string,
  tokenizer: TextTokenizer,
  slices: TextSlice[],
): Promise<number[][][]> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    throw new InputError(`cannot read text ${path}: ${(e as Error).message}`);
  }
  const all = tokenizer.encode(text);
  return slices.map((slice) => windows(all.slice(slice.skip, slice.skip + slice.max), slice.window));
}
