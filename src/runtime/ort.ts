import * as ort from "onnxruntime-web";
import { InputError } from "../errors.ts";
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

/** What adapter this process can get: none, a software one (lavapipe), or real hardware. */
export type AdapterKind = "none" | "software" | "hardware";

let adapterProbe: Promise<AdapterKind> | null = null;

export function probeAdapter(): Promise<AdapterKind> {
  adapterProbe ??= (async () => {
    ensureXdgRuntimeDir();
    try {
      const adapter = await navigator.gpu?.requestAdapter();
      if (!adapter) return "none";
      return adapter.info.isFallbackAdapter ? "software" : "hardware";
    } catch {
      return "none";
    }
  })();
  return adapterProbe;
}

/** Whether this process can get a WebGPU adapter (a real GPU, or lavapipe on a CPU machine). */
export async function webgpuAvailable(): Promise<boolean> {
  return (await probeAdapter()) !== "none";
}

/**
 * `auto` means WebGPU on real hardware and WASM otherwise: a software adapter (lavapipe) runs the
 * decoder several times slower than WASM SIMD. An explicit `webgpu` takes any adapter, and fails
 * when there is none.
 */
export async function resolveDevice(request: DeviceRequest): Promise<Device> {
  await configure();
  if (request === "wasm") return "wasm";
  const kind = await probeAdapter();
  if (request === "webgpu" && kind === "none") {
    throw new InputError("--device webgpu: no WebGPU adapter is available");
  }
  const device = request === "webgpu" || kind === "hardware" ? "webgpu" : "wasm";
  if (device === "webgpu") installFastUploads();
  return device;
}
