/// <reference lib="deno.worker" />
/**
 * The worker of scripts/synth_checkpoint.ts: fills one tensor's bytes of a safetensors file with bf16
 * normal samples. Each tensor has its own seed, so the checkpoint is the same whatever the number of
 * workers and whichever worker takes which tensor.
 */
import { rng } from "../src/numeric.ts";

/** One tensor: `n` bf16 values of N(0, std^2) (ones when std is 0) at byte `offset` of `file`. */
export interface TensorJob {
  file: string;
  offset: number;
  n: number;
  std: number;
  seed: number;
}

const f32 = new Float32Array(2);
const u32 = new Uint32Array(f32.buffer);
/** bf16 of a float32 bit pattern, rounding to nearest even on the 16 dropped bits. */
const bf16 = (x: number) => ((x + 0x7fff + ((x >> 16) & 1)) >>> 16) & 0xffff;

/** Fills `out` with bf16 normal samples: Box-Muller, both of each pair's values used. */
function fillNormalBf16(out: Uint16Array, std: number, random: () => number): void {
  if (std === 0) return void out.fill(0x3f80);
  for (let i = 0; i < out.length; i += 2) {
    const r = Math.sqrt(-2 * Math.log(Math.max(random(), 1e-12))) * std;
    const a = 2 * Math.PI * random();
    f32[0] = r * Math.cos(a);
    f32[1] = r * Math.sin(a);
    out[i] = bf16(u32[0]);
    if (i + 1 < out.length) out[i + 1] = bf16(u32[1]);
  }
}

async function write(job: TensorJob): Promise<void> {
  const random = rng(job.seed);
  const chunk = new Uint16Array(Math.min(job.n, 1 << 22));
  using f = await Deno.open(job.file, { write: true });
  await f.seek(job.offset, Deno.SeekMode.Start);
  for (let done = 0; done < job.n; done += chunk.length) {
    const part = chunk.subarray(0, Math.min(chunk.length, job.n - done));
    fillNormalBf16(part, job.std, random);
    const bytes = new Uint8Array(part.buffer, 0, part.length * 2);
    for (let w = 0; w < bytes.length;) w += await f.write(bytes.subarray(w));
  }
}

self.onmessage = async (e: MessageEvent<TensorJob>) => {
  try {
    await write(e.data);
    self.postMessage({ ok: true });
  } catch (err) {
    self.postMessage({ ok: false, error: String(err) });
  }
};
