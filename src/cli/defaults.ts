import { fileURLToPath } from "node:url";

/** The embedded default model; `deno compile` includes models/ so this resolves inside the binary too. */
export const DEFAULT_MODEL_DIR = fileURLToPath(new URL("../../models/tiny-nas", import.meta.url));

/** Held-out Python source shipped for calibration (`analyze`, POST /analysis) and evaluation. */
export const DEFAULT_CALIBRATION_TEXT = fileURLToPath(new URL("../../data/eval.py.txt", import.meta.url));
