/**
 * onnxruntime-web's multi-threaded WASM under Deno. With more than one thread, onnxruntime imports
 * its threaded glue module (the script that starts the pthread workers, which share the WASM memory).
 * When it cannot tell that the glue has the page's origin (Deno has no `location`), it fetches the
 * glue and imports it from a blob: URL, which Deno's module loader refuses ("Only file and data URLs
 * are supported"), so sessions fail to start. Given the glue's file URL as `wasmPaths.mjs`, the one
 * blob onnxruntime makes of it holds exactly the glue's bytes: for a blob of that size the object URL
 * is the file URL itself, which Deno imports (and starts module workers from) like any module.
 */
import { InputError } from "../errors.ts";
import { type Device, ort, useCpuThreads } from "./ort.ts";

const GLUE = new URL(
  "ort-wasm-simd-threaded.asyncify.mjs",
  import.meta.resolve("onnxruntime-web/asyncify.wasm"),
).href;

let installed = false;

/**
 * The threads a device's sessions use in this worker or process (`--threads`): WASM's default is one
 * (the serving thread keeps a core), native onnxruntime's the cores the process may use.
 */
export async function useThreads(device: Device, threads?: number): Promise<void> {
  if (device === "cpu") return useCpuThreads(threads ?? (navigator.hardwareConcurrency || 1));
  if (device === "wasm") await useWasmThreads(threads ?? 1);
}

/** Sets onnxruntime's WASM thread count (before its first session in this worker or process). */
async function useWasmThreads(threads: number): Promise<void> {
  ort.env.wasm.numThreads = threads;
  if (threads <= 1 || installed) return;
  installed = true;
  let glueBytes: number;
  try {
    glueBytes = (await Deno.stat(new URL(GLUE))).size;
  } catch (e) {
    throw new InputError(
      `more than one thread needs onnxruntime-web's threaded glue ${GLUE}: ${(e as Error).message}`,
      "threads",
    );
  }
  const createObjectURL = URL.createObjectURL;
  URL.createObjectURL = (obj: Blob) =>
    obj instanceof Blob && obj.size === glueBytes ? GLUE : createObjectURL(obj);
  ort.env.wasm.wasmPaths = { mjs: GLUE };
}
