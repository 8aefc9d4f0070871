/**
 * Hands the C allocator's free memory back to the system: glibc's `malloc_trim`, through FFI.
 *
 * Building a model frees far more than it keeps (checkpoint tensors decoded to fp32 16 MB at a
 * time, weights converted and written out), and glibc keeps what threads free in their arenas
 * unless it lies at an arena's top: after a 1B model's build, ~0.3 GB of free pages stayed resident
 * for the life of the process. `malloc_trim` returns every whole free page of every arena.
 * Where it cannot run (not glibc, or no --allow-ffi) the memory just stays, as it did.
 */
let trim: (() => void) | null | undefined;

/** Whether the trim ran. */
export function returnFreeMemory(): boolean {
  if (trim === undefined) trim = openTrim();
  if (!trim) return false;
  trim();
  return true;
}

function openTrim(): (() => void) | null {
  if (Deno.build.os !== "linux") return null;
  try {
    const libc = Deno.dlopen("libc.so.6", { malloc_trim: { parameters: ["usize"], result: "i32" } });
    return () => void libc.symbols.malloc_trim(0n);
  } catch {
    // musl has no libc.so.6 and no malloc_trim; without --allow-ffi, dlopen is refused.
    return null;
  }
}

/**
 * Frees a host array's memory now instead of at a garbage collection, when it is the whole of its
 * buffer (a run's output, copied out of onnxruntime); a view into a larger buffer is left alone. V8
 * collects these late: serving the 1B shape to 8 streams of 128 tokens, each step's 4 MB of logits
 * left behind raised the server's peak from 1.46x to 1.84x its weights (a collection after every step
 * kept it at 1.46x).
 */
export function freeHostArray(a: ArrayBufferView): void {
  const b = a.buffer;
  if (b instanceof ArrayBuffer && !b.detached && a.byteOffset === 0 && a.byteLength === b.byteLength) {
    b.transfer(0);
  }
}
