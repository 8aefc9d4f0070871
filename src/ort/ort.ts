import { join } from "node:path";
import * as ort from "onnxruntime-web";
import type { EncodedModel } from "../onnx/builder.ts";
import { InputError } from "../errors.ts";
import { externalData } from "./external_data.ts";
import { type FloatType, type GraphOptions, NATIVE_QUANTIZED } from "../onnx/format.ts";
import type { Quantization } from "../onnx/format.ts";
import { ensureXdgRuntimeDir } from "../webgpu/device.ts";
import { installFastUploads } from "../webgpu/upload_shim.ts";

export { ort };

/**
 * Where a model is served: WebGPU (onnxruntime-web's provider), WASM (onnxruntime-web's CPU build,
 * one 4 GiB heap), or `cpu`, native onnxruntime (onnxruntime-node: the CPU provider's AVX2/AVX-512
 * kernels and threads).
 */
export type Device = "webgpu" | "wasm" | "cpu";
export type DeviceRequest = Device | "auto";

/**
 * Where a session runs: a serving device, or native onnxruntime's own WebGPU provider (Dawn), which
 * the benchmark runs on the identical graph to show how far Deno's WebGPU is from native.
 */
export type Backend = Device | "native-webgpu";
export type NativeBackend = "cpu" | "native-webgpu";

export const isNative = (b: Backend): b is NativeBackend => b === "cpu" || b === "native-webgpu";

/** Threads native onnxruntime's CPU provider uses per session: the cores this process may use, unless set. */
let cpuThreadCount = navigator.hardwareConcurrency || 1;

export function useCpuThreads(threads: number): void {
  cpuThreadCount = threads;
}

export const cpuThreads = () => cpuThreadCount;

/** The onnxruntime API (web and node share it, from onnxruntime-common). */
export type OrtApi = Pick<typeof ort, "InferenceSession" | "Tensor">;

// The specifier is computed so that Deno fetches the 110 MB native package only when `--device cpu`
// or a benchmark's native column asks for it, never for serving or tests that do not.
// FUSEDGE_ONNXRUNTIME_NODE names another module (a vendored build; the tests, one that cannot load).
const NATIVE_PACKAGE = Deno.env.get("FUSEDGE_ONNXRUNTIME_NODE") ??
  ["npm:onnxruntime-node", "1.30.0"].join("@");
let native: Promise<OrtApi> | null = null;

/** onnxruntime-node, loaded on first use; rejects where its binary does not run. */
export function nativeOrt(): Promise<OrtApi> {
  native ??= import(NATIVE_PACKAGE).then((m) => (m.default ?? m) as OrtApi);
  return native;
}

/**
 * Creates a session for a graph whose weights are external data: onnxruntime-web takes them as bytes
 * (external_data.ts), onnxruntime-node reads them from files beside the graph: a temporary directory
 * gets links to the cache's files (written only for weights held in memory) and is removed once the
 * session holds the weights.
 */
export async function createSession(
  backend: Backend,
  model: EncodedModel,
  options: ort.InferenceSession.SessionOptions,
): Promise<ort.InferenceSession> {
  const rt = await runtimeFor(backend);
  if (!isNative(backend)) {
    const weights = externalData(model, backend === "wasm");
    try {
      const session = await rt.InferenceSession.create(model.graph, {
        ...options,
        externalData: weights.data,
      });
      releaseWasmBinary();
      return session;
    } finally {
      weights.release();
    }
  }
  const dir = await Deno.makeTempDir({ prefix: "fusedge-native-" });
  try {
    for (const { path, weight: w } of model.weights) {
      if ("bytes" in w) await Deno.writeFile(join(dir, path), w.bytes);
      else await linkOrCopy(w.file, join(dir, path));
    }
    await Deno.writeFile(join(dir, "model.onnx"), model.graph);
    return await rt.InferenceSession.create(join(dir, "model.onnx"), options);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function linkOrCopy(from: string, to: string): Promise<void> {
  try {
    await Deno.link(from, to);
  } catch {
    // Another filesystem (a cache directory outside TMPDIR's).
    await Deno.copyFile(from, to);
  }
}

export async function runtimeFor(backend: Backend): Promise<OrtApi> {
  if (!isNative(backend)) {
    await configure();
    return ort;
  }
  return await nativeOrt();
}

let configured = false;

/**
 * One-time onnxruntime-web setup for Deno. One WASM thread unless `useThreads` (threads.ts)
 * asked for more. The wasm binary is read from the package and handed over as bytes, because the
 * library's own fetch of a file: URL fails inside a `deno compile` binary.
 */
async function configure(): Promise<void> {
  if (configured) return;
  ort.env.wasm.numThreads ??= 1;
  ort.env.logLevel = "error";
  const url = import.meta.resolve("onnxruntime-web/asyncify.wasm");
  ort.env.wasm.wasmBinary = await Deno.readFile(new URL(url));
  configured = true;
}

/**
 * Frees the binary's 27 MB once a session exists: onnxruntime instantiates it once a thread, at its
 * first session, and its glue keeps a reference to the bytes for good. Detaching the buffer frees
 * them whoever holds it.
 */
function releaseWasmBinary(): void {
  const binary = ort.env.wasm.wasmBinary;
  if (binary instanceof Uint8Array && binary.buffer instanceof ArrayBuffer && !binary.buffer.detached) {
    binary.buffer.transfer(0);
  }
}

/** What adapter this process can get: none, a software one (lavapipe), or real hardware. */
export type AdapterKind = "none" | "software" | "hardware";

let adapterRequest: Promise<GPUAdapter | null> | null = null;

/**
 * The process's WebGPU adapter, requested once and only read (kind, limits, features); null where
 * there is none. onnxruntime and the WGSL benchmark request devices from adapters of their own.
 */
function adapter(): Promise<GPUAdapter | null> {
  adapterRequest ??= (async () => {
    ensureXdgRuntimeDir();
    try {
      return (await navigator.gpu?.requestAdapter()) ?? null;
    } catch {
      return null;
    }
  })();
  return adapterRequest;
}

export async function probeAdapter(): Promise<AdapterKind> {
  const a = await adapter();
  if (!a) return "none";
  return a.info.isFallbackAdapter ? "software" : "hardware";
}

/** The largest buffer the WebGPU adapter can bind (for the memory check); undefined off WebGPU. */
export async function adapterMaxBuffer(device: Device): Promise<number | undefined> {
  const a = device === "webgpu" ? await adapter() : null;
  return a ? Math.min(a.limits.maxBufferSize, a.limits.maxStorageBufferBindingSize) : undefined;
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
  if (request === "wasm") return "wasm";
  if (request === "cpu") {
    await nativeOrt().catch((e) => {
      native = null;
      throw new InputError(
        `--device cpu: native onnxruntime (onnxruntime-node) does not load here: ${
          (e as Error).message.split("\n")[0]
        }; use --device wasm or --device webgpu`,
        "device",
      );
    });
    return "cpu";
  }
  const kind = await probeAdapter();
  if (request === "webgpu" && kind === "none") {
    throw new InputError("--device webgpu: no WebGPU adapter is available");
  }
  const device = request === "webgpu" || kind === "hardware" ? "webgpu" : "wasm";
  if (device === "webgpu") installFastUploads();
  return device;
}

/**
 * `--dtype auto` is fp16 on WebGPU when the adapter has `shader-f16` and fp32 otherwise: onnxruntime's
 * WASM kernels compute in fp32, so fp16 there would only add casts. Quantized weights on native
 * onnxruntime compute in int8 (MatMulNBits' accuracy level 4), on WASM through integer GEMMs.
 */
export async function resolveGraphOptions(
  dtype: FloatType | "auto",
  quantize: Quantization,
  device: Backend,
): Promise<GraphOptions> {
  const f16 = device === "webgpu" && ((await adapter())?.features.has("shader-f16") ?? false);
  if (dtype === "fp16" && !f16) {
    throw new InputError(
      device === "webgpu"
        ? "--dtype fp16: this WebGPU adapter has no shader-f16; use --dtype fp32"
        : "--dtype fp16 runs on WebGPU only (the WASM and native CPU kernels compute in fp32); use --dtype fp32 or --device webgpu",
      "dtype",
    );
  }
  return {
    dtype: dtype === "auto" ? (f16 ? "fp16" : "fp32") : dtype,
    quantize,
    ...(device === "cpu" && quantize !== "none" ? NATIVE_QUANTIZED : {}),
    // WASM's MatMulNBits dequantizes every weight to fp32 on every call, slower than fp32 itself:
    // its quantized weights go through MatMulInteger, which has a WASM SIMD kernel.
    ...(device === "wasm" && quantize !== "none" ? { integer: true } : {}),
  };
}
