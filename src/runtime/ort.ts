import * as ort from "onnxruntime-web";
import { ensureXdgRuntimeDir } from "../webgpu/device.ts";
import { installFastUploads } from "../webgpu/upload_shim.ts";

export { ort };

export type Device = "webgpu" | "wasm";
export type DeviceRequest = Device | "auto";

let configured = false;

/**
 * One-time onnxruntime-web setup for Deno. Threads stay at 1: the threaded WASM build spawns workers
 * from blob: URLs, which Deno refuses. The wasm binary is read from the package and handed over as
 * bytes, because the library's own fetch of a file: URL fails inside a `deno compile` binary.
 */
async function configure(): Promise<void> {
  if (configured) return;
  ort.env.wasm.numThreads = 1;
  ort.env.logLevel = "error";
  const url = import.meta.resolve("onnxruntime-web/asyncify.wasm");
  ort.env.wasm.wasmBinary = await Deno.readFile(new URL(url));
  configured = true;
}

let adapterProbe: Promise<boolean> | null = null;

/** Whether this process can get a WebGPU adapter (a real GPU, or lavapipe on a CPU machine). */
export function webgpuAvailable(): Promise<boolean> {
  adapterProbe ??= (async () => {
    ensureXdgRuntimeDir();
    try {
      return (await navigator.gpu?.requestAdapter()) != null;
    } catch {
      return false;
    }
  })();
  return adapterProbe;
}

/** Resolves `auto` to WebGPU when an adapter exists, else WASM; an explicit webgpu without one is an error. */
export async function resolveDevice(request: DeviceRequest): Promise<Device> {
  await configure();
  if (request === "wasm") return "wasm";
  const gpu = await webgpuAvailable();
  if (request === "webgpu" && !gpu) throw new Error("--device webgpu: no WebGPU adapter is available");
  if (gpu) installFastUploads();
  return gpu ? "webgpu" : "wasm";
}
