/// <reference lib="deno.worker" />
/**
 * A helper of a ConvertPool (src/onnx/convert_pool.ts): converts the slices the pool puts in its shared
 * buffers, one at a time, and says so through shared memory alone. It blocks in Atomics.wait
 * between jobs, since the thread that feeds it is itself blocked in a synchronous graph build and
 * could read no message.
 */
import { convertedSizes, convertSlice } from "../onnx/quantize.ts";
import { type HelperBuffers, jobRows, readJob, State, writeError } from "../onnx/convert_pool.ts";

self.onmessage = (e: MessageEvent<HelperBuffers>) => {
  self.onmessage = null;
  const b = e.data;
  const input = new Float32Array(b.input);
  const out = {
    bytes: new Uint8Array(b.bytes),
    scales: new Float32Array(b.scales),
    zeros: new Uint8Array(b.zeros),
  };
  const ctrl = new Int32Array(b.ctrl);
  const signal = new Int32Array(b.signal);
  self.postMessage("ready");
  for (;;) {
    const state = Atomics.load(ctrl, 0);
    if (state === State.Stop) break;
    if (state !== State.Job) {
      Atomics.wait(ctrl, 0, state);
      continue;
    }
    let done: number = State.Done;
    try {
      const { job, k, rows } = readJob(ctrl);
      // int4 levels are or-ed in, two a byte: the last job's bytes must go first.
      const sizes = convertedSizes(job, k, rows);
      out.bytes.fill(0, 0, sizes.bytes);
      out.zeros.fill(0, 0, sizes.zeros);
      // The rows are this helper's own copy: an int4 round trip may overwrite them.
      convertSlice(job, k, jobRows(b, ctrl, input), { out, column: 0, stride: rows });
    } catch (err) {
      writeError(b, (err as Error).message ?? String(err));
      done = State.Failed;
    }
    Atomics.store(ctrl, 0, done);
    Atomics.add(signal, 0, 1);
    Atomics.notify(signal, 0);
  }
  self.close();
};
