import { z } from "zod";
import { BadCheckpointError } from "../errors.ts";
import { bf16ToF32, f16ToF32, f32ToBf16, f32ToF16 } from "./dtype.ts";
import { numel, type Tensor, tensor } from "./tensor.ts";
import { readAt } from "../file_io.ts";

/** Bytes per element of the dtypes a Llama checkpoint is stored in. */
const DTYPE_SIZE = { F32: 4, F16: 2, BF16: 2 } as const;
type Dtype = keyof typeof DTYPE_SIZE;

const READ_SLICE_BYTES = 16 << 20;

/** A header larger than this is a corrupt length field, not a real index. */
const MAX_HEADER_BYTES = 100 * 1024 * 1024;

const entrySchema = z.object({
  dtype: z.string(),
  shape: z.array(z.number().int().nonnegative()),
  data_offsets: z.tuple([z.number().int().nonnegative(), z.number().int().nonnegative()]),
});

export interface TensorEntry {
  name: string;
  dtype: Dtype;
  shape: number[];
  begin: number;
  end: number;
}

/** Where a file's tensor bytes come from: memory (tests, fixtures) or the file, a range at a time. */
type ByteSource = (begin: number, end: number) => Uint8Array;

/**
 * One .safetensors file: a validated index over its bytes, decoded tensor by tensor. Opened from a
 * path, only the header is read up front and each tensor's bytes are read when it is decoded, so a
 * checkpoint of any size is never held whole in memory.
 */
export class SafetensorsFile {
  private constructor(
    readonly path: string,
    readonly entries: Map<string, TensorEntry>,
    private readonly source: ByteSource,
    /** Where the tensor bytes start in the file; null for bytes in memory. */
    private readonly base: number | null,
  ) {}

  static async open(path: string): Promise<SafetensorsFile> {
    let file: Deno.FsFile;
    try {
      file = await Deno.open(path);
    } catch (e) {
      throw new BadCheckpointError(`cannot read ${path}: ${(e as Error).message}`);
    }
    const size = (await file.stat()).size;
    const read = (at: number, n: number): Uint8Array => {
      const out = new Uint8Array(n);
      const got = readAt(file, at, out);
      if (got < n) throw new BadCheckpointError(`${path}: file ended at byte ${at + got} of ${at + n}`);
      return out;
    };
    try {
      // The handle stays open for the tensor reads; the process (or worker) ending closes it.
      return SafetensorsFile.fromReader(path, size, read, true);
    } catch (e) {
      file.close();
      throw e;
    }
  }

  /** The same over bytes in memory (fixtures, tests). */
  static parse(path: string, bytes: Uint8Array): SafetensorsFile {
    return SafetensorsFile.fromReader(path, bytes.length, (at, n) => bytes.slice(at, at + n), false);
  }

  /** Checks every header field against the file before any tensor is read: a lying header fails here. */
  private static fromReader(
    path: string,
    size: number,
    readAt: (at: number, n: number) => Uint8Array,
    onDisk: boolean,
  ): SafetensorsFile {
    if (size < 8) {
      throw new BadCheckpointError(`${path}: file is ${size} bytes, too short for a safetensors header`);
    }
    const headerLen = Number(new DataView(readAt(0, 8).buffer).getBigUint64(0, true));
    if (headerLen > MAX_HEADER_BYTES || 8 + headerLen > size) {
      throw new BadCheckpointError(
        `${path}: header length ${headerLen} exceeds the file size ${size} (truncated or not safetensors)`,
      );
    }
    const entries = SafetensorsFile.index(path, readAt(8, headerLen), size - 8 - headerLen);
    const base = 8 + headerLen;
    return new SafetensorsFile(
      path,
      entries,
      (begin, end) => readAt(base + begin, end - begin),
      onDisk ? base : null,
    );
  }

  private static index(path: string, headerBytes: Uint8Array, dataLength: number): Map<string, TensorEntry> {
    const bad = (msg: string): never => {
      throw new BadCheckpointError(`${path}: ${msg}`);
    };
    let header: unknown;
    try {
      header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(headerBytes));
    } catch (e) {
      bad(`header is not valid JSON: ${(e as Error).message}`);
    }
    if (typeof header !== "object" || header === null || Array.isArray(header)) {
      bad("header is not a JSON object");
    }
    const entries = new Map<string, TensorEntry>();
    for (const [name, value] of Object.entries(header as Record<string, unknown>)) {
      if (name === "__metadata__") continue;
      const parsed = entrySchema.safeParse(value);
      if (!parsed.success) bad(`tensor "${name}": malformed entry (${parsed.error.issues[0].message})`);
      const { dtype, shape, data_offsets: [begin, end] } = parsed.data!;
      if (!(dtype in DTYPE_SIZE)) bad(`tensor "${name}": dtype ${dtype} is not supported (F32, F16, BF16)`);
      const expected = numel(shape) * DTYPE_SIZE[dtype as Dtype];
      if (end < begin || end - begin !== expected) {
        bad(
          `tensor "${name}": data_offsets [${begin}, ${end}] hold ${
            end - begin
          } bytes but ${dtype}[${shape}] needs ${expected}`,
        );
      }
      if (end > dataLength) {
        bad(
          `tensor "${name}": data_offsets end ${end} is past the end of the data (${dataLength} bytes; file truncated?)`,
        );
      }
      entries.set(name, { name, dtype: dtype as Dtype, shape, begin, end });
    }
    const sorted = [...entries.values()].sort((a, b) => a.begin - b.begin);
    for (let i = 1; i < sorted.length; i++) {
      if (sorted[i].begin < sorted[i - 1].end) {
        bad(`tensor "${sorted[i].name}" overlaps "${sorted[i - 1].name}"`);
      }
    }
    return entries;
  }

  /** Decodes one tensor to float32 (it does not alias the file's bytes). */
  read(name: string): Tensor {
    const e = this.entry(name);
    return tensor(e.shape, decode(e, this.source));
  }

  /**
   * One tensor as a reference to its bytes in the file, decoded on use (see fileTensor); a file parsed
   * from memory has nothing to refer to, so its tensor is decoded now.
   */
  tensor(name: string): Tensor {
    if (this.base === null) return this.read(name);
    return fileTensor({ path: this.path, base: this.base, entry: this.entry(name) });
  }

  private entry(name: string): TensorEntry {
    const e = this.entries.get(name);
    if (!e) throw new BadCheckpointError(`${this.path}: no tensor "${name}"`);
    return e;
  }
}

/**
 * Decodes a tensor's bytes to float32 (into `into` if given, which is at least as long), in slices: the
 * raw bytes held at once are one slice.
 */
function decode(e: TensorEntry, source: ByteSource, into?: Float32Array): Float32Array {
  const n = numel(e.shape);
  const out = into ? into.subarray(0, n) : new Float32Array(n);
  const size = DTYPE_SIZE[e.dtype];
  const step = Math.max(1, Math.floor(READ_SLICE_BYTES / size));
  for (let at = 0; at < n; at += step) {
    const m = Math.min(step, n - at);
    const raw = source(e.begin + at * size, e.begin + (at + m) * size);
    const dst = out.subarray(at, at + m);
    if (e.dtype === "F32") dst.set(new Float32Array(raw.buffer, raw.byteOffset, m));
    else if (e.dtype === "F16") f16ToF32(new Uint16Array(raw.buffer, raw.byteOffset, m), dst);
    else bf16ToF32(new Uint16Array(raw.buffer, raw.byteOffset, m), dst);
  }
  return out;
}

/** Where a file-backed tensor's bytes are: plain data, so it survives being posted to a worker. */
export interface FileRef {
  path: string;
  base: number;
  entry: TensorEntry;
}

/**
 * A file-backed tensor: its shape, its FileRef, and (not enumerable, so never cloned) its data, a fresh
 * decode once the task that last read it has ended: writing into it changes nothing lasting, so code
 * that changes weights makes new tensors.
 */
interface FileTensor extends Tensor {
  readonly file: FileRef;
}

/**
 * A tensor whose float32 data is decoded from its file when read: a served model's checkpoint is not
 * resident beside the converted weights the sessions hold (a 1B model is 5 GB in fp32), and a later
 * build (a swap, an analysis, an export) reads what it needs again. Reading opens the file, so a
 * worker that receives the tensor (its data accessor stays behind: see attachFiles) reads the same
 * bytes. The last few tensors read are kept until the current task ends (see RECENT), so a loop that
 * indexes `t.data` does not decode it again each time.
 */
function fileTensor(file: FileRef): FileTensor {
  const t = { shape: [...file.entry.shape], file } as unknown as FileTensor;
  attach(t);
  return t;
}

/**
 * Decoded tensors kept for the rest of the current task, most recent last: a few, because a build
 * reads every weight in one synchronous pass and must not hold them all (a WeakRef would: its target
 * lives until the task ends), and only until the task ends, so nothing stays resident after a build.
 */
const RECENT = new Map<FileTensor, Float32Array>();
const RECENT_MAX = 4;
let clearing = false;
/** The most recent of RECENT: reading it again is one comparison. */
let last: FileTensor | null = null;

function forgetDecoded(): void {
  RECENT.clear();
  last = null;
}

/**
 * Frees the decoded tensors kept for the current task now (their arrays become empty), for a caller
 * that is done reading weights and is about to take memory of its own in the same task (a session's
 * weights): the last few a build read include the largest, the LM head (1 GB in fp32 at a 128K
 * vocabulary), which the collector would free only at its next pass.
 */
export function releaseDecoded(): void {
  for (const data of RECENT.values()) (data.buffer as ArrayBuffer).transfer(0);
  forgetDecoded();
}

function attach(t: FileTensor): void {
  Object.defineProperty(t, "data", {
    enumerable: false,
    get() {
      if (last === t) return RECENT.get(t)!;
      let data = RECENT.get(t);
      if (data) RECENT.delete(t);
      else data = readFile(t.file);
      RECENT.set(t, data);
      last = t;
      if (RECENT.size > RECENT_MAX) RECENT.delete(RECENT.keys().next().value!);
      if (!clearing) {
        clearing = true;
        setTimeout(() => {
          forgetDecoded();
          clearing = false;
        }, 0);
      }
      return data;
    },
  });
}

let scratch: Uint8Array | null = null;

/**
 * Rows [from, to) of a 2-D tensor's float32 data (along its first dimension), without decoding the rest:
 * a file-backed tensor not decoded already reads just their bytes (into `into`, if given, at least
 * (to - from) rows long), so code that walks a large table a slice of rows at a time (quantizing an
 * embedding or a head of 1 GB in fp32) never holds it whole, and through one buffer faults its memory in
 * once rather than once a slice. The rows may be the tensor's own data: callers do not write into them.
 */
export function tensorRows(t: Tensor, from: number, to: number, into?: Float32Array): Float32Array {
  const file = rowSource(t);
  if (file) return fileRows(file, from, to, into);
  const width = t.shape.slice(1).reduce((a, b) => a * b, 1);
  return t.data.subarray(from * width, to * width);
}

/**
 * Where tensorRows reads a tensor's rows from: its file, or null where its data is at hand (a tensor
 * in memory, or a file-backed one decoded already). Plain data: another thread can read the rows.
 */
export function rowSource(t: Tensor): FileRef | null {
  const file = (t as Partial<FileTensor>).file;
  return file && !RECENT.has(t as FileTensor) ? file : null;
}

/** Rows [from, to) of a file-backed tensor, read from its file (into `into`, if given). */
export function fileRows(file: FileRef, from: number, to: number, into?: Float32Array): Float32Array {
  const { entry } = file;
  const width = entry.shape.slice(1).reduce((a, b) => a * b, 1);
  const size = DTYPE_SIZE[entry.dtype];
  const begin = entry.begin + from * width * size;
  const end = begin + (to - from) * width * size;
  return readFile({ ...file, entry: { ...entry, shape: [to - from, width], begin, end } }, into);
}

function readFile({ path, base, entry }: FileRef, into?: Float32Array): Float32Array {
  let file: Deno.FsFile;
  try {
    file = Deno.openSync(path);
  } catch (e) {
    throw new BadCheckpointError(`cannot read ${path}: ${(e as Error).message}`);
  }
  try {
    return decode(entry, (begin, end) => {
      // One buffer for every slice: a new one each slice would leave the build's allocator with
      // gigabytes it has freed but not returned to the system.
      scratch ??= new Uint8Array(READ_SLICE_BYTES);
      const out = scratch.subarray(0, end - begin);
      const got = readAt(file, base + begin, out);
      if (got < out.length) throw new BadCheckpointError(`${path}: file ended at byte ${base + begin + got}`);
      return out;
    }, into);
  } finally {
    file.close();
  }
}

/**
 * Gives the file-backed tensors in a value that was posted from another thread their data accessor
 * back (structured cloning keeps their shape and FileRef, not the accessor). Walks plain objects and
 * arrays; typed arrays and everything else are left alone.
 */
export function attachFiles<T>(value: T): T {
  const seen = new Set<object>();
  const walk = (v: unknown) => {
    if (typeof v !== "object" || v === null || seen.has(v) || ArrayBuffer.isView(v)) return;
    seen.add(v);
    const o = v as Record<string, unknown>;
    if ("file" in o && "shape" in o && !("data" in o)) return attach(o as unknown as FileTensor);
    for (const child of Array.isArray(v) ? v : Object.values(o)) walk(child);
  };
  walk(value);
  return value;
}

/** Encodes a safetensors file in memory (test fixtures are built with it). */
export function encodeSafetensors(tensors: Record<string, Tensor>, dtype: "F32" | "F16" = "F32"): Uint8Array {
  const header: Record<string, unknown> = { __metadata__: { format: "pt" } };
  const parts: Uint8Array[] = [];
  let offset = 0;
  for (const [name, t] of Object.entries(tensors)) {
    let bytes: Uint8Array;
    if (dtype === "F32") {
      bytes = new Uint8Array(t.data.buffer.slice(t.data.byteOffset, t.data.byteOffset + t.data.byteLength));
    } else bytes = new Uint8Array(f32ToF16(t.data).buffer);
    header[name] = { dtype, shape: t.shape, data_offsets: [offset, offset + bytes.length] };
    parts.push(bytes);
    offset += bytes.length;
  }
  let json = JSON.stringify(header);
  while ((json.length + 8) % 8 !== 0) json += " ";
  const headerBytes = new TextEncoder().encode(json);
  const out = new Uint8Array(8 + headerBytes.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(headerBytes.length), true);
  out.set(headerBytes, 8);
  let pos = 8 + headerBytes.length;
  for (const p of parts) {
    out.set(p, pos);
    pos += p.length;
  }
  return out;
}

/** A tensor to write: its data is produced when its turn comes, so a shard never sits in memory whole. */
export interface TensorToWrite {
  name: string;
  shape: readonly number[];
  data: () => Float32Array;
}

export type StoredType = "F32" | "F16" | "BF16";

export const STORED_SIZE: Record<StoredType, number> = { F32: 4, F16: 2, BF16: 2 };

function storedBytes(data: Float32Array, dtype: StoredType): Uint8Array {
  if (dtype === "F32") return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  const half = dtype === "F16" ? f32ToF16(data) : f32ToBf16(data);
  return new Uint8Array(half.buffer);
}

/**
 * Writes one safetensors file tensor by tensor: the header first (every size follows from the shapes),
 * then each tensor's bytes as it is produced, so writing a 2 GB shard holds one tensor at a time.
 */
export async function writeSafetensors(
  path: string,
  tensors: TensorToWrite[],
  dtype: StoredType,
): Promise<number> {
  const header: Record<string, unknown> = { __metadata__: { format: "pt" } };
  let offset = 0;
  for (const t of tensors) {
    const bytes = numel(t.shape) * STORED_SIZE[dtype];
    header[t.name] = { dtype, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  while ((json.length + 8) % 8 !== 0) json += " ";
  const headerBytes = new TextEncoder().encode(json);
  const file = await Deno.open(path, { write: true, create: true, truncate: true });
  try {
    const prefix = new Uint8Array(8 + headerBytes.length);
    new DataView(prefix.buffer).setBigUint64(0, BigInt(headerBytes.length), true);
    prefix.set(headerBytes, 8);
    await writeAll(file, prefix);
    for (const t of tensors) {
      const data = t.data();
      if (data.length !== numel(t.shape)) {
        throw new Error(`${t.name}: ${data.length} values for shape [${t.shape}]`);
      }
      await writeAll(file, storedBytes(data, dtype));
    }
  } finally {
    file.close();
  }
  return 8 + headerBytes.length + offset;
}

async function writeAll(file: Deno.FsFile, bytes: Uint8Array): Promise<void> {
  for (let at = 0; at < bytes.length;) at += await file.write(bytes.subarray(at));
}
