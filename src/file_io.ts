/**
 * Reads `out.length` bytes of `file` from byte `at` into `out`; returns how many it read, fewer only
 * where the file ends first. Both file-backed readers (checkpoint tensors, onnxruntime-web's weight
 * files) read through it.
 */
export function readAt(file: Deno.FsFile, at: number, out: Uint8Array): number {
  file.seekSync(at, Deno.SeekMode.Start);
  let got = 0;
  while (got < out.length) {
    const k = file.readSync(out.subarray(got));
    if (k === null) break;
    got += k;
  }
  return got;
}
