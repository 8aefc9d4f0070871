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

/** [rows, cols] -> [cols, rows]: HF stores linear weights as [out, in]; the graph multiplies x @ W. */
export function transpose2d(t: Tensor): Tensor {
  const [rows, cols] = t.shape;
  const out = new Float32Array(rows * cols);
  for (let r = 0; r < rows; r++) {
    const base = r * cols;
    for (let c = 0; c < cols; c++) out[c * rows + r] = t.data[base + c];
  }
  return tensor([cols, rows], out);
}
