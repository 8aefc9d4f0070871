import assert from "node:assert/strict";
import { resolveDevice } from "../src/ort/ort.ts";
import { readFloats } from "../src/webgpu/device.ts";
import { HAS_WEBGPU } from "./helpers.ts";

Deno.test({
  name: "upload shim: mapped-at-creation staging buffers deliver their bytes through writeBuffer",
  ignore: !HAS_WEBGPU,
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    await resolveDevice("webgpu"); // installs the shim
    const adapter = await navigator.gpu.requestAdapter();
    const device = await adapter!.requestDevice();
    let writes = 0;
    const write = device.queue.writeBuffer.bind(device.queue);
    device.queue.writeBuffer = ((...args: Parameters<GPUQueue["writeBuffer"]>) => {
      writes++;
      return write(...args);
    }) as GPUQueue["writeBuffer"];
    const data = Float32Array.from({ length: 1024 }, (_, i) => Math.sin(i) * 100);
    const staging = device.createBuffer({
      size: data.byteLength,
      usage: GPUBufferUsage.MAP_WRITE | GPUBufferUsage.COPY_SRC,
      mappedAtCreation: true,
    });
    new Float32Array(staging.getMappedRange()).set(data);
    assert.equal(writes, 0);
    staging.unmap();
    assert.equal(writes, 1, "one writeBuffer carries the whole upload");
    const dst = device.createBuffer({
      size: data.byteLength,
      usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC,
    });
    const enc = device.createCommandEncoder();
    enc.copyBufferToBuffer(staging, 0, dst, 0, data.byteLength);
    device.queue.submit([enc.finish()]);
    assert.deepEqual(await readFloats(device, dst, data.length), data);
    assert.throws(() => staging.getMappedRange(), /not mapped/);
    // Buffers that are read back or mapped for other uses are left alone.
    const readable = device.createBuffer({
      size: 16,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
    assert.equal(readable.mapState, "unmapped");
    const mappedStorage = device.createBuffer({
      size: 16,
      usage: GPUBufferUsage.STORAGE,
      mappedAtCreation: true,
    });
    assert.equal(mappedStorage.mapState, "mapped");
    mappedStorage.unmap();
    assert.equal(writes, 1);
    device.destroy();
  },
});
