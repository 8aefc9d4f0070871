import { join } from "node:path";
import { convertInline, type ConvertSlices } from "./quantize.ts";

/** Element types a stored weight can have in the graph. */
export type WeightElem = "float32" | "float16" | "uint8" | "int8";

/**
 * A weight as the graph stores it: its type and dims, and the bytes of its external-data file, held
 * in memory or in a file of a cache directory (read by onnxruntime when a session is created).
 */
export type StoredWeight =
  & { elem: WeightElem; dims: number[]; byteLength: number }
  & ({ bytes: Uint8Array } | { file: string });

/** A stored weight's bytes (a file-backed one is read now). */
export function readWeight(w: StoredWeight): Uint8Array {
  return "bytes" in w ? w.bytes : Deno.readFileSync(w.file);
}

export type WeightArray = Float32Array | Uint16Array | Uint8Array | Int8Array;

/**
 * How a cache miss makes a weight: new data, or `borrowed`, data that belongs to someone else (a
 * checkpoint tensor's, when a weight is stored as it is).
 */
export type WeightMaker = () => { elem: WeightElem; dims: number[]; data: WeightArray; borrowed?: boolean };

export type WeightEntries = Map<string, StoredWeight>;

const WRITE_SLICE_BYTES = 16 << 20;

/**
 * The weights of built graphs, converted (transposed, fused, cast to fp16, quantized) and kept by
 * initializer name. Names say what a weight holds (`ffn.3_4_5.gate` is the fused gate of layers
 * 3-5), so a later plan's graph built through the same cache converts only the weights of groups it
 * changes and reuses the rest byte for byte. A cache given a directory writes each weight it makes
 * to a file there and keeps only the file's name: the process then holds no copy of the converted
 * model besides onnxruntime's own, and entries pass between the serving thread and the build
 * workers as names.
 */
export class WeightCache {
  /** Bytes converted by this cache's misses (what a plan swap had to rebuild). */
  builtBytes = 0;
  /** Bytes served from entries made by earlier builds. */
  reusedBytes = 0;
  /** Entries made here, to hand back to whoever keeps the cache across builds. */
  readonly added: WeightEntries = new Map();
  /** Every name this build used, so the keeper knows which entries are still live. */
  readonly used = new Set<string>();
  /** How quantization's slices run: here, or on a build's helper threads (onnx/convert_pool.ts). */
  convert: ConvertSlices = convertInline;
  constructor(
    /** The weight format: entries of another format are never confused with these. */
    readonly format: string,
    private readonly earlier: WeightEntries = new Map(),
    /** Where made weights are written (see the class comment); in memory when absent. */
    private readonly dir?: string,
  ) {}

  get(name: string, make: WeightMaker): StoredWeight {
    const key = `${this.format}/${name}`;
    this.used.add(key);
    const hit = this.earlier.get(key) ?? this.added.get(key);
    if (hit) {
      this.reusedBytes += hit.byteLength;
      return hit;
    }
    const { elem, dims, data, borrowed } = make();
    const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    const stored: StoredWeight = this.dir
      ? { elem, dims, byteLength: bytes.byteLength, file: this.write(key, bytes) }
      // Kept in memory, borrowed data is copied: its owner may free it (see releaseDecoded).
      : { elem, dims, byteLength: bytes.byteLength, bytes: borrowed ? bytes.slice() : bytes };
    // Written, new data is freed now rather than at the collector's next pass, which may come only
    // after a session has taken as much again.
    if (this.dir && !borrowed) (data.buffer as ArrayBuffer).transfer(0);
    this.added.set(key, stored);
    this.builtBytes += stored.byteLength;
    return stored;
  }

  /**
   * Each write is a new file (a build writes a key once, into a directory of its own: `createNew`
   * fails loudly otherwise): a file a live session may still map is never rewritten, and deleting an
   * old entry never races a new one of the same key. Written in slices: Deno.writeFileSync copies the
   * whole buffer first (a 1B model's fp32 embedding: 1 GB more at the build's peak).
   */
  private write(key: string, bytes: Uint8Array): string {
    const file = join(this.dir!, `${encodeURIComponent(key)}.bin`);
    using f = Deno.openSync(file, { write: true, createNew: true });
    for (let at = 0; at < bytes.length;) {
      at += f.writeSync(bytes.subarray(at, Math.min(bytes.length, at + WRITE_SLICE_BYTES)));
    }
    return file;
  }
}

/**
 * The converted weights a process keeps between builds, as files of one temporary directory (under
 * TMPDIR): its owner hands a `buildDir()` and the `entries` to each build, adds what the build made
 * (or discards the build's directory), and deletes what no live instance uses. The directory goes when
 * the owner closes the store or the process exits.
 */
export class WeightStore {
  readonly entries: WeightEntries = new Map();
  private made: string | null = null;
  private builds = 0;
  private readonly onUnload = () => this.close();

  get dir(): string {
    if (!this.made) {
      this.made = Deno.makeTempDirSync({ prefix: "fusedge-weights-" });
      globalThis.addEventListener("unload", this.onUnload);
    }
    return this.made;
  }

  /**
   * A directory of its own for one build's new weights, so that a build that fails or is cancelled
   * is discarded whole (its files are in no entry).
   */
  buildDir(): string {
    const dir = join(this.dir, `build-${++this.builds}`);
    Deno.mkdirSync(dir);
    return dir;
  }

  discard(buildDir: string): void {
    Deno.remove(buildDir, { recursive: true }).catch(() => {});
  }

  add(entries: WeightEntries): void {
    for (const [key, w] of entries) this.entries.set(key, w);
  }

  /** Bytes of the weights kept. */
  get bytes(): number {
    let sum = 0;
    for (const w of this.entries.values()) sum += w.byteLength;
    return sum;
  }

  /** Deletes every entry whose key is not in `live`; resolves once their files are gone. */
  async keepOnly(live: Set<string>): Promise<void> {
    const files: string[] = [];
    for (const [key, w] of this.entries) {
      if (live.has(key)) continue;
      this.entries.delete(key);
      if ("file" in w) files.push(w.file);
    }
    await Promise.all(files.map((f) => Deno.remove(f).catch(() => {})));
  }

  close(): void {
    this.entries.clear();
    if (!this.made) return;
    globalThis.removeEventListener("unload", this.onUnload);
    try {
      Deno.removeSync(this.made, { recursive: true });
    } catch {
      // Already gone (another owner's cleanup of TMPDIR); nothing is left to free.
    }
    this.made = null;
  }
}
