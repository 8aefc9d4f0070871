const KERNELS = new URL("../../kernels/", import.meta.url);

/**
 * Compiles one of kernels/*.wgsl and surfaces its compilation errors as an Error: WebGPU otherwise
 * reports them only as a device-lost or validation warning much later, at pipeline creation.
 */
export async function compileKernel(
  device: GPUDevice,
  name: string,
  transform: (source: string) => string = (s) => s,
): Promise<GPUShaderModule> {
  const code = transform(await Deno.readTextFile(new URL(name, KERNELS)));
  const module = device.createShaderModule({ label: name, code });
  const errors = (await module.getCompilationInfo()).messages.filter((m) => m.type === "error");
  if (errors.length) {
    throw new Error(`${name}: ${errors.map((e) => `${e.lineNum}:${e.linePos} ${e.message}`).join("; ")}`);
  }
  return module;
}
