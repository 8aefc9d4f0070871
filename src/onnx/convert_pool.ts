/**
 * Weight conversion on every core. A build quantizes a 1B model's weights in one thread for most of a
 * start (native int4: 23 of 36 s), while the graph builder that asks for them is synchronous (its
 * weight cache's makers return bytes). So the pool keeps that shape: `convert` is synchronous too. The
 * calling thread hands each slice of rows to a free helper (where the checkpoint's file is, which the
 * helper reads and decodes itself, or the rows, copied into the helper's shared buffer when they are in
 * memory: a fused group's weights) and goes on to the next while helpers convert, then copies each
 * helper's output into the weight's arrays; it blocks in Atomics.wait only when every helper is busy.
 * Helpers
 * start before the build (`ConvertHelpers.start`, which is async) in the thread that owns the
 * building one, and end when the build does.
 *
 * The outputs are those of the one-thread conversion byte for byte: each slice's values depend on
 * its rows alone, and the same function (quantize.ts convertSlice) converts them.
 */
import type { Tensor } from "../model/tensor.ts";
import { type FileRef, fileRows, rowSource, tensorRows } from "../model/safetensors.ts";
import {
  type Converted,
  convertedSizes,
  convertInline,
  placeSlice,
  SLICE_ELEMS,
  type SliceJob,
  sliceRows,
} from "./quantize.ts";

/** A helper's state, its first control word: Job while it converts, Stop ends it. */
export const State = { Idle: 0, Job: 1, Done: 2, Failed: 3, Stop: 4 } as const;

/** The shared buffers of one helper: its control words, its input rows, its outputs. */
export interface HelperBuffers {
  ctrl: SharedArrayBuffer;
  /** Counts finished jobs across helpers: the feeding thread waits on it for any helper. */
  signal: SharedArrayBuffer;
  input: SharedArrayBuffer;
  bytes: SharedArrayBuffer;
  scales: SharedArrayBuffer;
  zeros: SharedArrayBuffer;
  error: SharedArrayBuffer;
  /** Where the rows are in a checkpoint's file, when the helper reads them (see writeSource). */
  path: SharedArrayBuffer;
  where: SharedArrayBuffer;
}

// Control words: state, the job's kind and its parameters, the error's length, where its rows are
// (1: in the file of `path` and `where`; 0: in the input buffer), the file's dtype, the path's length.
const KIND = 1, K = 2, ROWS = 3, BITS = 4, BLOCK = 5, ZEROS = 6, ERROR_LENGTH = 7;
const FROM_FILE = 8, DTYPE = 9, PATH_LENGTH = 10, CONTROL_WORDS = 11;
const DTYPES: FileRef["entry"]["dtype"][] = ["F32", "F16", "BF16"];
const PATH_BYTES = 4096;
const KINDS: SliceJob["kind"][] = ["nbits", "columns", "rows"];
const ERROR_BYTES = 1024;
/** A helper's scales and zero points take a slice's elements over this (a scale a row, or a block, of 32 or more). */
const MIN_K = 32;

function writeJob(ctrl: Int32Array, job: SliceJob, k: number, rows: number): void {
  ctrl[FROM_FILE] = 0;
  ctrl[KIND] = KINDS.indexOf(job.kind);
  ctrl[K] = k;
  ctrl[ROWS] = rows;
  ctrl[BITS] = job.kind === "nbits"
    ? job.layout.bits
    : job.kind === "columns"
    ? (job.q === "int8" ? 8 : 4)
    : 0;
  ctrl[BLOCK] = job.kind === "nbits" ? job.layout.block : job.kind === "columns" ? job.block : 0;
  ctrl[ZEROS] = job.kind === "nbits" && job.layout.zeroPoints ? 1 : 0;
}

export function readJob(ctrl: Int32Array): { job: SliceJob; k: number; rows: number } {
  const kind = KINDS[ctrl[KIND]];
  const bits = ctrl[BITS] as 4 | 8;
  const job: SliceJob = kind === "nbits"
    ? { kind, layout: { bits, block: ctrl[BLOCK], zeroPoints: ctrl[ZEROS] === 1 } }
    : kind === "columns"
    ? { kind, q: bits === 8 ? "int8" : "int4", block: ctrl[BLOCK] }
    : { kind: "rows" };
  return { job, k: ctrl[K], rows: ctrl[ROWS] };
}

/** Says that the job's rows are rows `from` onward of a checkpoint's file, whose encoded path is `path`. */
function writeSource(
  b: HelperBuffers,
  ctrl: Int32Array,
  file: FileRef,
  path: Uint8Array,
  from: number,
): void {
  new Uint8Array(b.path).set(path);
  ctrl[PATH_LENGTH] = path.length;
  ctrl[DTYPE] = DTYPES.indexOf(file.entry.dtype);
  // Byte offsets pass 2^31 in a large shard.
  new Float64Array(b.where).set([file.base, file.entry.begin, from]);
  ctrl[FROM_FILE] = 1;
}

/** The job's rows, read from its file into `into` or there already. */
export function jobRows(b: HelperBuffers, ctrl: Int32Array, into: Float32Array): Float32Array {
  const k = ctrl[K], rows = ctrl[ROWS];
  if (ctrl[FROM_FILE] === 0) return into.subarray(0, rows * k);
  const path = new TextDecoder().decode(new Uint8Array(b.path, 0, ctrl[PATH_LENGTH]).slice());
  const [base, begin, from] = new Float64Array(b.where);
  const dtype = DTYPES[ctrl[DTYPE]];
  // The file's tensor seen as its first from + rows rows: fileRows takes the last `rows` of them.
  const entry = { name: "", dtype, shape: [from + rows, k], begin, end: begin };
  return fileRows({ path, base, entry }, from, from + rows, into);
}

export function writeError(b: HelperBuffers, message: string): void {
  const bytes = new TextEncoder().encode(message).subarray(0, ERROR_BYTES);
  new Uint8Array(b.error).set(bytes);
  new Int32Array(b.ctrl)[ERROR_LENGTH] = bytes.length;
}

function readError(b: HelperBuffers): string {
  const length = new Int32Array(b.ctrl)[ERROR_LENGTH];
  // TextDecoder takes no views of shared memory: a copy.
  return new TextDecoder().decode(new Uint8Array(b.error, 0, length).slice());
}

/** Whether a slice of the job's output fits a helper's buffers. */
function fits(job: SliceJob, k: number): boolean {
  if (k > SLICE_ELEMS) return false;
  const { bytes, scales, zeros } = convertedSizes(job, k, sliceRows(k));
  return bytes <= SLICE_ELEMS && scales <= SLICE_ELEMS / MIN_K && zeros <= SLICE_ELEMS / MIN_K;
}

interface Helper {
  buffers: HelperBuffers;
  ctrl: Int32Array;
  input: Float32Array;
  local: Converted;
  /** The slice it holds until its output is placed. */
  slice: { from: number; to: number } | null;
}

/**
 * The helper threads: started and ended by the thread that owns the building one (a worker that is
 * terminated leaves its own workers running), which hands their `buffers` to a ConvertPool there.
 */
export class ConvertHelpers {
  private closed = false;

  private constructor(private readonly workers: Worker[], readonly buffers: HelperBuffers[]) {}

  /** Starts `threads` helpers (each with 16 MB of input and 4.6 MB of output buffers) and waits for them. */
  static async start(threads: number): Promise<ConvertHelpers> {
    const signal = new SharedArrayBuffer(4);
    const buffers = Array.from({ length: threads }, (): HelperBuffers => ({
      ctrl: new SharedArrayBuffer(CONTROL_WORDS * 4),
      signal,
      input: new SharedArrayBuffer(SLICE_ELEMS * 4),
      bytes: new SharedArrayBuffer(SLICE_ELEMS),
      scales: new SharedArrayBuffer((SLICE_ELEMS / MIN_K) * 4),
      zeros: new SharedArrayBuffer(SLICE_ELEMS / MIN_K),
      error: new SharedArrayBuffer(ERROR_BYTES),
      path: new SharedArrayBuffer(PATH_BYTES),
      where: new SharedArrayBuffer(3 * 8),
    }));
    const workers = buffers.map(() =>
      new Worker(new URL("../workers/convert_worker.ts", import.meta.url).href, { type: "module" })
    );
    const helpers = new ConvertHelpers(workers, buffers);
    try {
      await Promise.all(workers.map((w, i) =>
        new Promise<void>((resolve, reject) => {
          w.onmessage = () => resolve();
          w.onerror = (e) => {
            e.preventDefault();
            reject(new Error(`a conversion helper did not start: ${e.message}`));
          };
          w.postMessage(buffers[i]);
        })
      ));
    } catch (e) {
      helpers.close();
      throw e;
    }
    return helpers;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.buffers.forEach((b, i) => {
      const ctrl = new Int32Array(b.ctrl);
      Atomics.store(ctrl, 0, State.Stop);
      Atomics.notify(ctrl, 0);
      this.workers[i].terminate();
    });
  }
}

/** Converts weights' slices on the helpers whose buffers it is given; see the module comment. */
export class ConvertPool {
  private broken = false;
  private readonly helpers: Helper[];
  private readonly signal: Int32Array;

  constructor(buffers: HelperBuffers[]) {
    this.signal = new Int32Array(buffers[0].signal);
    this.helpers = buffers.map((b) => ({
      buffers: b,
      ctrl: new Int32Array(b.ctrl),
      input: new Float32Array(b.input),
      local: {
        bytes: new Uint8Array(b.bytes),
        scales: new Float32Array(b.scales),
        zeros: new Uint8Array(b.zeros),
      },
      slice: null,
    }));
  }

  /**
   * convertInline's work, the slices spread over the helpers. Weights of one slice, or too narrow
   * for the helpers' buffers, are converted here.
   */
  readonly convert = (t: Tensor, job: SliceJob, out: Converted): void => {
    const [n, k] = t.shape;
    const rows = sliceRows(k);
    if (this.broken || n <= rows || !fits(job, k)) return convertInline(t, job, out);
    try {
      // Helpers read a file-backed weight's rows themselves, unless its path is too long for their buffer.
      const file = rowSource(t);
      const path = file && new TextEncoder().encode(file.path);
      const fromFile = path !== null && path.length <= PATH_BYTES;
      for (let from = 0; from < n; from += rows) {
        const to = Math.min(n, from + rows);
        const h = this.idle(t, job, out);
        writeJob(h.ctrl, job, k, to - from);
        if (fromFile) writeSource(h.buffers, h.ctrl, file!, path, from);
        // A weight held in memory gives its own rows: the helper gets a copy it may overwrite.
        else h.input.set(tensorRows(t, from, to));
        h.slice = { from, to };
        Atomics.store(h.ctrl, 0, State.Job);
        Atomics.notify(h.ctrl, 0);
      }
      for (const h of this.helpers) this.collect(h, t, job, out, true);
    } catch (e) {
      // Helpers left mid-job would write into buffers the next weight reuses: none is given another.
      this.broken = true;
      throw e;
    }
  };

  /** A helper with no job, the output of its last one placed: waits for one to finish if none is. */
  private idle(t: Tensor, job: SliceJob, out: Converted): Helper {
    for (;;) {
      const seen = Atomics.load(this.signal, 0);
      for (const h of this.helpers) if (this.collect(h, t, job, out, false)) return h;
      Atomics.wait(this.signal, 0, seen);
    }
  }

  /** Places a helper's finished slice; false while it is still converting (or, if `wait`, waits). */
  private collect(h: Helper, t: Tensor, job: SliceJob, out: Converted, wait: boolean): boolean {
    let state = Atomics.load(h.ctrl, 0);
    while (wait && state === State.Job) {
      // Helpers notify the shared count, not their own word: read it before looking again.
      const seen = Atomics.load(this.signal, 0);
      state = Atomics.load(h.ctrl, 0);
      if (state === State.Job) Atomics.wait(this.signal, 0, seen);
    }
    if (state === State.Job) return false;
    if (state === State.Failed) throw new Error(`weight conversion failed: ${readError(h.buffers)}`);
    if (state === State.Stop) throw new Error("weight conversion failed: its helper threads were ended");
    if (h.slice) {
      placeSlice(job, t.shape, h.slice.from, h.slice.to, h.local, out);
      h.slice = null;
    }
    return true;
  }
}
