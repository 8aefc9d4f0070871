/**
 * Deno's WebGPU makes `mappedAtCreation` uploads far slower than `queue.writeBuffer` (session
 * creation took tens of seconds for a few hundred MB on an H100), and onnxruntime-web uploads every
 * initializer that way: a MAP_WRITE | COPY_SRC staging buffer created mapped, filled, unmapped, then
 * copied to its storage buffer. This shim gives such staging buffers a host-side mapping instead: the buffer is
 * created unmapped with COPY_DST in place of MAP_WRITE, `getMappedRange` hands out host memory, and
 * `unmap` sends it with one `writeBuffer`. The GPU sees the same bytes, in the same queue order.
 */

const STAGING = GPUBufferUsage.MAP_WRITE | GPUBufferUsage.COPY_SRC;

let installed = false;

export function installFastUploads(): void {
  if (installed) return;
  installed = true;
  const create = GPUDevice.prototype.createBuffer;
  GPUDevice.prototype.createBuffer = function (this: GPUDevice, desc: GPUBufferDescriptor): GPUBuffer {
    if (!desc.mappedAtCreation || desc.usage !== STAGING) return create.call(this, desc);
    const buffer = create.call(this, {
      ...desc,
      mappedAtCreation: false,
      usage: GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
    });
    const host = new ArrayBuffer(desc.size);
    const queue = this.queue;
    let mapped = true;
    Object.defineProperties(buffer, {
      getMappedRange: {
        value: (offset = 0, size?: number) => {
          if (!mapped) throw new Error("fusedge upload shim: buffer is not mapped");
          return subrange(host, offset, size);
        },
      },
      unmap: {
        value: () => {
          if (!mapped) return;
          mapped = false;
          queue.writeBuffer(buffer, 0, host);
        },
      },
      mapAsync: {
        value: () => Promise.reject(new Error("fusedge upload shim: staging buffers are write-once")),
      },
      mapState: { get: () => (mapped ? "mapped" : "unmapped") },
    });
    return buffer;
  };
}

/** A view onto [offset, offset + size) of the host mapping, as WebGPU's getMappedRange returns. */
function subrange(host: ArrayBuffer, offset: number, size?: number): ArrayBuffer {
  if (offset === 0 && (size === undefined || size === host.byteLength)) return host;
  // WebGPU returns an ArrayBuffer aliasing the range; writes must land in `host`, so ranges other
  // than the whole buffer are not supported (onnxruntime maps whole staging buffers).
  throw new Error(`fusedge upload shim: partial mapped range [${offset}, ${size}) is not supported`);
}
