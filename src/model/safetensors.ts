import { z } from "zod";
import { BadCheckpointError } from "../errors.ts";
import { bf16ToF32, f16ToF32, f32ToF16 } from "./dtype.ts";
import { numel, type Tensor, tensor } from "./tensor.ts";

/** Bytes per element of the dtypes a Llama checkpoint is stored in. */
const DTYPE_SIZE = { F32: 4, F16: 2, BF16: 2 } as const;
type Dtype = keyof typeof DTYPE_SIZE;

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

/** One parsed .safetensors file: a validated index over the raw bytes, decoded tensor by tensor. */
export class SafetensorsFile {
  private constructor(
    readonly path: string,
    readonly entries: Map<string, TensorEntry>,
    private readonly data: Uint8Array,
  ) {}

  static async open(path: string): Promise<SafetensorsFile> {
    let bytes: Uint8Array;
    try {
      bytes = await Deno.readFile(path);
    } catch (e) {
      throw new BadCheckpointError(`cannot read ${path}: ${(e as Error).message}`);
    }
    return SafetensorsFile.parse(path, bytes);
  }

  /** Checks every header field against the file before any tensor is read: a lying header fails here. */
  static parse(path: string, bytes: Uint8Array): SafetensorsFile {
    const bad = (msg: string): never => {
      throw new BadCheckpointError(`${path}: ${msg}`);
    };
    if (bytes.length < 8) bad(`file is ${bytes.length} bytes, too short for a safetensors header`);
    const headerLen = Number(new DataView(bytes.buffer, bytes.byteOffset, 8).getBigUint64(0, true));
    if (headerLen > MAX_HEADER_BYTES || 8 + headerLen > bytes.length) {
      bad(`header length ${headerLen} exceeds the file size ${bytes.length} (truncated or not safetensors)`);
    }
    let header: unknown;
    try {
      header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes.subarray(8, 8 + headerLen)));
    } catch (e) {
      bad(`header is not valid JSON: ${(e as Error).message}`);
    }
    if (typeof header !== "object" || header === null || Array.isArray(header)) {
      bad("header is not a JSON object");
    }
    const data = bytes.subarray(8 + headerLen);
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
      if (end > data.length) {
        bad(
          `tensor "${name}": data_offsets end ${end} is past the end of the data (${data.length} bytes; file truncated?)`,
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
    return new SafetensorsFile(path, entries, data);
  }

  /** Decodes one tensor to float32 (copying: the result does not alias the file buffer). */
  read(name: string): Tensor {
    const e = this.entries.get(name);
    if (!e) throw new BadCheckpointError(`${this.path}: no tensor "${name}"`);
    const raw = this.data.slice(e.begin, e.end);
    const n = numel(e.shape);
    switch (e.dtype) {
      case "F32":
        return tensor(e.shape, new Float32Array(raw.buffer, 0, n));
      case "F16":
        return tensor(e.shape, f16ToF32(new Uint16Array(raw.buffer, 0, n)));
      case "BF16":
        return tensor(e.shape, bf16ToF32(new Uint16Array(raw.buffer, 0, n)));
    }
  }
}

/** Writes a safetensors file (test fixtures are built with it). */
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
