/** Element types a stored weight can have in the graph. */
export type WeightElem = "float32" | "float16" | "uint8" | "int8";

/** A weight as the graph stores it: the bytes of its external-data file, with their type and dims. */
export interface StoredWeight {
  elem: WeightElem;
  dims: number[];
  bytes: Uint8Array;
}

export type WeightArray = Float32Array | Uint16Array | Uint8Array | Int8Array;

/** How a cache miss makes a weight: it allocates through `alloc`, so new weights land where the cache keeps them. */
export type WeightMaker = (alloc: Allocator) => { elem: WeightElem; dims: number[]; data: WeightArray };

export interface Allocator {
  f32(n: number): Float32Array;
  u16(n: number): Uint16Array;
  u8(n: number): Uint8Array;
  i8(n: number): Int8Array;
}

function allocator(shared: boolean): Allocator {
  const buffer = (bytes: number) => (shared ? new SharedArrayBuffer(bytes) : new ArrayBuffer(bytes));
  return {
    f32: (n) => new Float32Array(buffer(n * 4)),
    u16: (n) => new Uint16Array(buffer(n * 2)),
    u8: (n) => new Uint8Array(buffer(n)),
    i8: (n) => new Int8Array(buffer(n)),
  };
}

export type WeightEntries = Map<string, StoredWeight>;

/**
 * The weights of built graphs, converted (transposed, fused, cast to fp16, quantized) and kept by
 * initializer name. Names say what a weight holds (`ffn.3_4_5.gate` is the fused gate of layers
 * 3-5), so a later plan's graph built through the same cache converts only the weights of groups it
 * changes and reuses the rest byte for byte. A shared cache allocates in SharedArrayBuffers so its
 * entries pass between the serving thread and the build workers without copies.
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
  private readonly alloc: Allocator;

  constructor(
    /** The weight format: entries of another format are never confused with these. */
    readonly format: string,
    private readonly earlier: WeightEntries = new Map(),
    private readonly shared = false,
  ) {
    this.alloc = allocator(shared);
  }

  get(name: string, make: WeightMaker): StoredWeight {
    const key = `${this.format}/${name}`;
    this.used.add(key);
    const hit = this.earlier.get(key) ?? this.added.get(key);
    if (hit) {
      this.reusedBytes += hit.bytes.byteLength;
      return hit;
    }
    const { elem, dims, data } = make(this.alloc);
    let bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    // A weight taken as it is (an fp32 embedding, a small table) may sit in unshared memory.
    if (this.shared && !(bytes.buffer instanceof SharedArrayBuffer)) {
      const copy = this.alloc.u8(bytes.length);
      copy.set(bytes);
      bytes = copy;
    }
    const stored = { elem, dims, bytes };
    this.added.set(key, stored);
    this.builtBytes += stored.bytes.byteLength;
    return stored;
  }
}
