import { readAt } from "../file_io.ts";
import type { EncodedModel } from "../onnx/builder.ts";

/** onnxruntime-web's external data: each weight file's path and its bytes, or a stand-in that reads them. */
interface ExternalData {
  path: string;
  data: Uint8Array;
}

/**
 * A graph's weights as onnxruntime-web takes them, and a `release` for once the session holds them.
 * Weights in memory go as views of their bytes; a file-backed weight goes as a FileBytes that reads
 * the file only when onnxruntime copies that weight. onnxruntime-web copies each initializer with
 * `HEAPU8.set(data.subarray(offset, offset + length), at)` after checking `data.byteLength`, or hands
 * the subarray to WebGPU's upload; answering those from the file means the weights pass through this
 * process once instead of being held in JS while the session is created.
 *
 * `intoHeap` (WASM, whose weights all go to the heap) skips even the read buffer: the subarray is a
 * FileRange, and `set` reads the file straight into the heap. A buffer would hold the largest weight
 * beside the heap (a 1B model's int8 head, 250 MB, read last when the heap is nearly full: the peak
 * of serving it). WebGPU's upload needs real bytes, so there each weight is read into one buffer
 * reused for all of them. The external-data parity tests fail if a later onnxruntime-web reads the
 * bytes any other way.
 */
export function externalData(
  model: EncodedModel,
  intoHeap: boolean,
): { data: ExternalData[]; release: () => void } {
  const scratch = intoHeap ? null : new ReadBuffer();
  if (intoHeap) installHeapReads();
  const data = model.weights.map(({ path, weight: w }) => ({
    path,
    data: "bytes" in w ? w.bytes : new FileBytes(w.file, w.byteLength, scratch),
  }));
  return {
    data,
    release: () => {
      scratch?.release();
      if (intoHeap) uninstallHeapReads();
    },
  };
}

/**
 * One buffer that every weight of a session's creation is read into in turn: onnxruntime copies each
 * before asking for the next, and a new buffer for each weight would leave the whole model for the
 * collector to find while the device holds the same again.
 */
class ReadBuffer {
  private bytes: Uint8Array<ArrayBuffer> | null = null;

  take(length: number): Uint8Array<ArrayBuffer> {
    if (!this.bytes || this.bytes.length < length) {
      this.release();
      this.bytes = new Uint8Array(length);
    }
    return this.bytes.subarray(0, length);
  }

  release(): void {
    this.bytes?.buffer.transfer(0);
    this.bytes = null;
  }
}

/** A weight file as external data: its length, and its bytes read when a range of them is asked for. */
class FileBytes extends Uint8Array {
  constructor(
    readonly file: string,
    private readonly size: number,
    private readonly scratch: ReadBuffer | null,
  ) {
    super(0);
  }

  override get byteLength(): number {
    return this.size;
  }

  override subarray(begin = 0, end = this.size): Uint8Array<ArrayBuffer> {
    if (!this.scratch) return new FileRange(this.file, begin, end) as Uint8Array<ArrayBuffer>;
    const out = this.scratch.take(end - begin);
    readRange(this.file, begin, out);
    return out;
  }
}

/** Reads `out.length` bytes of `file` from byte `begin`, all of them or an error. */
function readRange(file: string, begin: number, out: Uint8Array): void {
  using f = Deno.openSync(file);
  if (readAt(f, begin, out) < out.length) throw new Error(`${file}: ends before byte ${begin + out.length}`);
}

/** [begin, end) of a file, not yet read: what `set` reads into the heap in place. */
class FileRange extends Uint8Array {
  constructor(readonly file: string, readonly begin: number, readonly end: number) {
    super(0);
  }
}

const originalSet = Uint8Array.prototype.set;
/** Sessions being created with heap reads; `set` is wrapped only while there are any. */
let heapReaders = 0;

function installHeapReads(): void {
  if (heapReaders++ > 0) return;
  Uint8Array.prototype.set = function (this: Uint8Array, source: ArrayLike<number>, offset = 0) {
    if (!(source instanceof FileRange)) return originalSet.call(this, source, offset);
    const length = source.end - source.begin;
    if (offset < 0 || offset + length > this.length) throw new RangeError("offset is out of bounds");
    readRange(source.file, source.begin, this.subarray(offset, offset + length));
  } as typeof originalSet;
}

function uninstallHeapReads(): void {
  if (--heapReaders === 0) Uint8Array.prototype.set = originalSet;
}
