/** A dense row-major float32 tensor: the one in-memory form weights take after loading. */
export interface Tensor {
  readonly shape: readonly number[];
  readonly data: Float32Array;
}

export function numel(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

export function tensor(shape: readonly number[], data: Float32Array): Tensor {
  if (numel(shape) !== data.length) {
    throw new Error(`tensor data has ${data.length} elements but shape [${shape}] needs ${numel(shape)}`);
  }
  return { shape: [...shape], data };
}

/**
 * A tensor whose data is computed on first read (and kept): its shape is known for free, so a graph
 * can be laid out around weights that are never materialised when converted copies are cached.
 */
export function lazyTensor(shape: readonly number[], compute: () => Float32Array): Tensor {
  let data: Float32Array | null = null;
  return {
    shape: [...shape],
    get data() {
      return (data ??= compute());
    },
  };
}

const TILE = 64;

/**
 * [rows, cols] -> [cols, rows]: HF stores linear weights as [out, in]; the graph multiplies x @ W.
 * Tiled, so that reads and writes both stay within cache lines (a 128256 x 2048 LM head is 1 GB).
 */
export function transpose2d(t: Tensor, out: Float32Array = new Float32Array(t.data.length)): Tensor {
  const [rows, cols] = t.shape;
  const src = t.data;
  for (let r0 = 0; r0 < rows; r0 += TILE) {
    const r1 = Math.min(rows, r0 + TILE);
    for (let c0 = 0; c0 < cols; c0 += TILE) {
      const c1 = Math.min(cols, c0 + TILE);
      for (let r = r0; r < r1; r++) {
        const base = r * cols;
        for (let c = c0; c < c1; c++) out[c * rows + r] = src[base + c];
      }
    }
  }
  return tensor([cols, rows], out);
}

/**
 * Matrices of `rows` rows side by side, [rows, sum of their widths] (at least one part): how a fused
 * group's down projection holds its members' columns, and its activations their units.
 */
export function concatColumns<T extends Float32Array | Float64Array>(parts: T[], rows: number): T {
  const widths = parts.map((p) => p.length / rows);
  const total = widths.reduce((a, b) => a + b, 0);
  // The parts' own array type: fused weights are float32, healing's activations float64.
  const out = new (parts[0].constructor as new (n: number) => T)(rows * total);
  let offset = 0;
  parts.forEach((p, j) => {
    const w = widths[j];
    for (let r = 0; r < rows; r++) out.set(p.subarray(r * w, (r + 1) * w), r * total + offset);
    offset += w;
  });
  return out;
}

/** concatColumns undone: [rows, sum of widths] cut into [rows, widths[j]] matrices. */
export function splitColumns(m: Float32Array, rows: number, widths: number[]): Float32Array[] {
  const total = widths.reduce((a, b) => a + b, 0);
  let offset = 0;
  return widths.map((w) => {
    const part = new Float32Array(rows * w);
    for (let r = 0; r < rows; r++) part.set(m.subarray(r * total + offset, r * total + offset + w), r * w);
    offset += w;
    return part;
  });
}
