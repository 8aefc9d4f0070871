/** A WebGPU device for fusedge's own kernels, with the adapter's largest buffer limits and f16 if offered. */
export interface Gpu {
  device: GPUDevice;
  adapter: GPUAdapter;
  hasF16: boolean;
  description: string;
}

/** The Vulkan loader complains on every device open without XDG_RUNTIME_DIR (headless servers, CI). */
export function ensureXdgRuntimeDir(): void {
  if (!Deno.env.get("XDG_RUNTIME_DIR")) {
    Deno.env.set("XDG_RUNTIME_DIR", Deno.makeTempDirSync({ prefix: "fusedge-xdg-" }));
  }
}

export async function requestGpu(): Promise<Gpu> {
  ensureXdgRuntimeDir();
  const adapter = await navigator.gpu?.requestAdapter({ powerPreference: "high-performance" });
  if (!adapter) throw new Error("no WebGPU adapter is available");
  const hasF16 = adapter.features.has("shader-f16");
  const device = await adapter.requestDevice({
    requiredFeatures: hasF16 ? ["shader-f16"] : [],
    requiredLimits: {
      maxBufferSize: adapter.limits.maxBufferSize,
      maxStorageBufferBindingSize: adapter.limits.maxStorageBufferBindingSize,
    },
  });
  const info = adapter.info;
  const description =
    [info.vendor, info.architecture, info.device, info.description].filter(Boolean).join(" ") ||
    "unknown adapter";
  return { device, adapter, hasF16, description };
}

export type BufferUse = "storage" | "uniform" | "readback";

/** Uploads go through queue.writeBuffer: mappedAtCreation is far slower under Deno (upload_shim.ts). */
export function upload(device: GPUDevice, data: ArrayBufferView, use: BufferUse = "storage"): GPUBuffer {
  const size = Math.max(16, Math.ceil(data.byteLength / 4) * 4);
  const usage = use === "uniform"
    ? GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST
    : GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC;
  const buffer = device.createBuffer({ size, usage });
  const bytes = new Uint8Array(data.buffer as ArrayBuffer, data.byteOffset, data.byteLength);
  if (bytes.byteLength % 4 === 0) device.queue.writeBuffer(buffer, 0, bytes);
  else {
    const padded = new Uint8Array(Math.ceil(bytes.byteLength / 4) * 4);
    padded.set(bytes);
    device.queue.writeBuffer(buffer, 0, padded);
  }
  return buffer;
}

export function storage(device: GPUDevice, bytes: number): GPUBuffer {
  return device.createBuffer({
    size: Math.max(16, Math.ceil(bytes / 4) * 4),
    usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC,
  });
}

/** Copies a buffer back to the CPU (one mapAsync: ~11 ms under Deno, so never per token). */
export async function readFloats(device: GPUDevice, src: GPUBuffer, count: number): Promise<Float32Array> {
  const staging = device.createBuffer({
    size: count * 4,
    usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
  });
  const enc = device.createCommandEncoder();
  enc.copyBufferToBuffer(src, 0, staging, 0, count * 4);
  device.queue.submit([enc.finish()]);
  await staging.mapAsync(GPUMapMode.READ);
  const out = new Float32Array(staging.getMappedRange().slice(0));
  staging.unmap();
  staging.destroy();
  return out;
}
