/** Bit-exact half/bfloat16 <-> float32 conversion for checkpoint and graph tensors. */

let halfTable: Float32Array | null = null;

function halfBitsToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 0x1f) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

/** All 65536 half values decoded once: a lookup beats bit twiddling per element. */
function table(): Float32Array {
  if (!halfTable) {
    halfTable = new Float32Array(65536);
    for (let i = 0; i < 65536; i++) halfTable[i] = halfBitsToFloat(i);
  }
  return halfTable;
}

/** Half -> float32, into `out` when given (a decode writes each slice into its place in the tensor). */
export function f16ToF32(src: Uint16Array, out: Float32Array = new Float32Array(src.length)): Float32Array {
  const t = table();
  for (let i = 0; i < src.length; i++) out[i] = t[src[i]];
  return out;
}

/** bfloat16 -> float32 (the top half of the float's bits), into `out` when given. */
export function bf16ToF32(src: Uint16Array, out: Float32Array = new Float32Array(src.length)): Float32Array {
  const bits = new Uint32Array(out.buffer, out.byteOffset, src.length);
  for (let i = 0; i < src.length; i++) bits[i] = src[i] << 16;
  return out;
}

/** float32 -> half bits (round to nearest even), into `out` when given; the engine's Float16Array converts. */
export function f32ToF16(src: Float32Array, out: Uint16Array = new Uint16Array(src.length)): Uint16Array {
  new Float16Array(out.buffer, out.byteOffset, src.length).set(src);
  return out;
}

/** float32 -> bfloat16 bits, rounded to nearest even (NaN stays NaN), into `out` when given. */
export function f32ToBf16(src: Float32Array, out: Uint16Array = new Uint16Array(src.length)): Uint16Array {
  const bits = new Uint32Array(src.buffer, src.byteOffset, src.length);
  for (let i = 0; i < src.length; i++) {
    const b = bits[i];
    out[i] = (b & 0x7fffffff) > 0x7f800000 ? (b >>> 16) | 0x40 : (b + 0x7fff + ((b >>> 16) & 1)) >>> 16;
  }
  return out;
}
