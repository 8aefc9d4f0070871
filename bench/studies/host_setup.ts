/**
 * What the host-device studies (attention_forms.ts) start from; not a study itself.
 */
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { fail } from "../../scripts/args.ts";
import { loadAssets, type ModelAssets } from "../../src/instance/build.ts";
import { resolveDevice } from "../../src/ort/ort.ts";

const root = fileURLToPath(new URL("../..", import.meta.url));

/** The shipped model a study runs on by default. */
export const DEFAULT_MODEL = join(root, "models", "tiny-nas");

/**
 * `--device` (cpu or wasm) checked and resolved, `--model` loaded, and the held-out text's first
 * `need` token ids; exits 2 naming the flag when one is bad, and with `tooLong` when the ids do not
 * fit the text or `span` positions do not fit the model's context.
 */
export async function hostStudy(
  device: string,
  model: string,
  need: number,
  span: number,
  tooLong: string,
): Promise<{ device: "cpu" | "wasm"; assets: ModelAssets; ids: number[] }> {
  if (device !== "cpu" && device !== "wasm") fail(`--device: cpu or wasm, got ${device}`);
  await resolveDevice(device).catch((e) => fail(`--device ${device}: ${(e as Error).message}`));
  const assets = await loadAssets(model).catch((e) => fail(`--model ${model}: ${(e as Error).message}`));
  const text = await Deno.readTextFile(join(root, "data", "eval.py.txt"));
  const ids = assets.tokenizer.encode(text.slice(0, need * 16)).slice(0, need);
  if (ids.length < need || span >= assets.checkpoint.config.maxPositions) fail(tooLong);
  return { device, assets, ids };
}
