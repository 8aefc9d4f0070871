import type { Block } from "../model/blocks.ts";
import type { Checkpoint } from "../model/checkpoint.ts";
import {
  type AttentionForm,
  buildDecoderGraph,
  type DecoderGraph,
  newKey,
  newValue,
  pastKey,
  pastValue,
  presentKey,
  presentValue,
} from "../onnx/decoder.ts";
import type { FloatType } from "../onnx/format.ts";
import { type Backend, cpuThreads, createSession, ort, type OrtApi, runtimeFor } from "./ort.ts";
import {
  appendRows,
  type BatchCache,
  disposeBatch,
  dropRows,
  freeBatch,
  packRows,
  type RowSource,
  sourceLength,
} from "./kv_batch.ts";
import { freeHostArray } from "../free_memory.ts";
import { yieldIfBusy } from "../yield.ts";
import { EmbeddingRows } from "./embedding_rows.ts";

/**
 * One sequence's attention cache: on the GPU between steps under WebGPU, in JS memory otherwise,
 * [1, kvHeads, width, headDim] with its `length` tokens first (width is more where steps write in place).
 */
export interface KvCache {
  length: number;
  tensors: Map<string, ort.Tensor>;
}

/**
 * The width a cache kept in place grows to when a step needs `need` positions: a quarter more, at
 * least 32, but no more than `limit` (what the caller may hold) unless the step needs it.
 */
const headroom = (need: number, limit = Infinity) =>
  Math.max(need, Math.min(need + Math.max(32, need >> 2), limit));

export interface StepResult {
  /** [tokens, vocab] row-major: one row of next-token logits per input position. */
  logits: Float32Array;
  cache: KvCache;
}

/** A step whose logits stay where the session left them: in a GPU buffer under WebGPU. */
export interface TensorStepResult {
  /** [1, tokens, vocab]; the caller disposes it. */
  logits: ort.Tensor;
  cache: KvCache;
}

/** Step input: token ids from the host, or one id already on the GPU (an int32 written by a kernel). */
export type StepInput = number[] | GPUBuffer;

/** Which positions of a step get logits: every one (scoring, prompt logprobs) or the last (the next token). */
export type LogitRows = "all" | "last";

/**
 * Rows of a decode step whose next tokens are drawn from the graph's exponentials
 * (DecoderGraph.sampling) instead of from their logits on the host.
 */
export interface StepDraws {
  /** Rows of the batch, ascending. */
  rows: number[];
  /** Each one's 1 / temperature. */
  inverseTemperature: number[];
  /** Whether another row reads its logits (greedy, penalties, a grammar, logprobs): if not, none are fetched. */
  logits: boolean;
}

/** A sequence's next prompt tokens in a prefill run: `ids` after the positions `from` holds (null: none). */
export interface PrefillRow {
  ids: number[];
  from: RowSource | null;
}

/**
 * A decoder graph loaded into onnxruntime-web. onnxruntime-web sessions must not run concurrently,
 * so runs are chained: callers may interleave steps of many sequences, each with its own cache.
 */
export class ModelSession {
  private chain: Promise<unknown> = Promise.resolve();
  private released = false;
  /**
   * Steps write into the caches they were given (the MatMul form, on a host device): a step outputs
   * only the positions it wrote, not every present, whose copy out of onnxruntime into new memory grew
   * each step's time with every row's length.
   */
  readonly inPlace: boolean;
  /** The outputs every run fetches: each layer's new keys and values, or its presents. */
  private readonly cacheOutputs: string[];
  /** Where the graph takes its tokens' embedding rows from the host (DecoderGraph.embedding). */
  private readonly embedding: EmbeddingRows | null;

  private constructor(
    private readonly session: ort.InferenceSession,
    readonly graph: DecoderGraph,
    readonly device: Backend,
    readonly vocabSize: number,
    private readonly rt: OrtApi,
  ) {
    this.inPlace = graph.newKv && onHost(device);
    this.cacheOutputs = graph.cache.flatMap(({ layer }) =>
      graph.newKv ? [newKey(layer), newValue(layer)] : [presentKey(layer), presentValue(layer)]
    );
    this.embedding = graph.embedding ? new EmbeddingRows(graph.embedding) : null;
  }

  static async create(graph: DecoderGraph, device: Backend, vocabSize: number): Promise<ModelSession> {
    const rt = await runtimeFor(device);
    const preferred: Record<string, "gpu-buffer" | "cpu"> = {
      logits: device === "webgpu" ? "gpu-buffer" : "cpu",
    };
    if (device === "webgpu") {
      for (const { layer } of graph.cache) {
        preferred[presentKey(layer)] = "gpu-buffer";
        preferred[presentValue(layer)] = "gpu-buffer";
      }
    }
    const session = await createSession(device, graph.model, {
      executionProviders: [device === "native-webgpu" ? "webgpu" : device],
      ...(device === "cpu" ? { intraOpNumThreads: cpuThreads(), interOpNumThreads: 1 } : {}),
      graphOptimizationLevel: "all",
      preferredOutputLocation: preferred,
      // Warnings such as "shape ops assigned to CPU" are expected for this graph; errors still show.
      logSeverityLevel: 3,
    });
    return new ModelSession(session, graph, device, vocabSize, rt);
  }

  emptyCache(): KvCache {
    return { length: 0, tensors: emptyPast(this.rt, this.graph) };
  }

  /**
   * Runs `ids` after the cached prefix; the old cache is consumed and must not be used again. The
   * logits are [ids.length, vocab], or [1, vocab] for the last position only.
   */
  async step(ids: number[], cache: KvCache, rows: LogitRows = "all"): Promise<StepResult> {
    const r = await this.stepTensor(ids, cache, rows);
    // Under WebGPU this download is the step's one readback (~11 ms under Deno).
    const logits = (await r.logits.getData(true)) as Float32Array;
    return { logits, cache: r.cache };
  }

  /** Logits [tokens, vocab] of a whole sequence from an empty cache (scoring a window); the cache is freed. */
  async logitsOf(ids: number[]): Promise<Float32Array> {
    const { logits, cache } = await this.step(ids, this.emptyCache());
    disposeCache(cache);
    return logits;
  }

  /** Like `step`, but leaves the logits in place (a GPU buffer under WebGPU) for on-device sampling. */
  stepTensor(input: StepInput, cache: KvCache, rows: LogitRows = "all"): Promise<TensorStepResult> {
    const run = this.chain.then(() => this.runStep(input, cache, rows));
    this.chain = run.catch(() => {});
    return run;
  }

  /** The WebGPU device onnxruntime runs on, for kernels that read its buffers. */
  async gpuDevice(): Promise<GPUDevice> {
    if (this.device !== "webgpu") throw new Error("not a WebGPU session");
    return await ort.env.webgpu.device as GPUDevice;
  }

  /**
   * One decode step of several sequences at once: `ids[b]` follows row b of `cache` (see BatchCache),
   * each at its own position. The old cache is consumed; the new one has every row one position
   * longer, in the same layout.
   */
  decodeBatch(
    ids: number[],
    cache: BatchCache,
    /** The widest a cache kept in place may grow to (beyond what the step needs). */
    maxWidth = Infinity,
    /** Rows drawn from the graph's exponentials, where the graph has them. */
    draws?: StepDraws,
  ): Promise<{ logits: Float32Array; probs: Float32Array | null; cache: BatchCache }> {
    const run = this.chain.then(async () => {
      const rows = ids.length;
      const lengths = cache.lengths.map((l) => l + 1);
      const past = this.inPlace ? await this.withRoom(cache, 1, maxWidth) : cache;
      // Widened: the batch's old buffers are copied and nothing else holds them.
      if (past !== cache) freeBatch(cache);
      const drawn = this.graph.sampling && draws?.rows.length ? draws : null;
      const out = await this.run(
        {
          input_ids: new this.rt.Tensor("int32", Int32Array.from(ids), [rows, 1]),
          ...lengthFeeds(this.rt, lengths),
          logit_positions: logitPositions(this.rt, rows, 1, "last"),
          ...(drawn ? this.drawFeeds(drawn) : {}),
        },
        past.tensors,
        { logits: !drawn || drawn.logits, probs: !!drawn },
      );
      // Not fetched: an empty row, so that callers index nothing.
      const logits = out.logits ? (await out.logits.getData(true)) as Float32Array : new Float32Array(0);
      const probs = drawn ? out.sample_probs.data as Float32Array : null;
      if (this.inPlace) {
        this.writeNew(out, past, ids.map(() => 1), 1);
        // A map of its own: disposing the cache this step consumed must not empty this one.
        return { logits, probs, cache: { ...past, lengths, tensors: new Map(past.tensors) } };
      }
      disposeBatch(cache);
      const tensors = this.presents(out);
      const width = tensors.values().next().value?.dims[2] ?? Math.max(...lengths);
      return { logits, probs, cache: { width, lengths, tensors } };
    });
    this.chain = run.catch(() => {});
    return run;
  }

  /**
   * One prefill run of several sequences: row b's ids follow the positions its source holds, the rows
   * right-padded to the longest (a padded position comes after every real one of its row, so no real
   * query sees it, and its keys are never written). One run of 8 ten-token prompts took 305-412 ms on
   * the 1B shape's native int4 graph against 442-494 for 8 runs (MLAS reads each weight once a run).
   * Returns a batch cache of the rows (their sources' positions, then their new ones) with room for
   * the next step within `maxWidth`, in buffers for `rowCapacity` rows, and the logits of each row's
   * last position [rows, vocab] or of every real position, row after row ("all"). Several rows need a
   * session whose steps write in place (the fused operator reads padding as tokens).
   */
  prefillRows(
    rows: PrefillRow[],
    logits: LogitRows,
    maxWidth = Infinity,
    rowCapacity = rows.length,
  ): Promise<{ logits: Float32Array; cache: BatchCache }> {
    if (!this.inPlace && rows.length !== 1) {
      return Promise.reject(new Error("a prefill run of several rows needs caches written in place"));
    }
    const run = this.chain.then(async () => {
      const counts = rows.map((r) => r.ids.length);
      const cached = rows.map((r) => r.from ? sourceLength(r.from) : 0);
      if (!this.inPlace) {
        const from = rows[0].from;
        const past = from ? await this.single(from) : this.emptyCache();
        const r = await this.runStep(rows[0].ids, past, logits);
        return { logits: (await r.logits.getData(true)) as Float32Array, cache: asBatch(r.cache) };
      }
      const width = Math.max(...counts);
      const need = Math.max(...counts.map((n, b) => cached[b] + n));
      const room = await this.rowsWithRoom(rows.map((r) => r.from), need, maxWidth, rowCapacity);
      const ids = new Int32Array(rows.length * width);
      rows.forEach((r, b) => {
        ids.set(r.ids, b * width);
        ids.fill(r.ids[r.ids.length - 1], b * width + r.ids.length, (b + 1) * width);
      });
      const out = await this.run({
        input_ids: new this.rt.Tensor("int32", ids, [rows.length, width]),
        // Each row as if all `width` tokens were its own: the padding's positions follow its real ones.
        ...lengthFeeds(this.rt, cached.map((c) => c + width)),
        logit_positions: raggedLogitPositions(this.rt, counts, width, logits),
        // A first run reads no cache (see runStep).
      }, cached.every((c) => c === 0) ? emptyPast(this.rt, this.graph, rows.length) : room.tensors);
      this.writeNew(out, room, counts, width);
      const data = (await out.logits.getData(true)) as Float32Array;
      const lengths = cached.map((c, b) => c + counts[b]);
      return { logits: data, cache: { ...room, lengths, tensors: new Map(room.tensors) } };
    });
    this.chain = run.catch(() => {});
    return run;
  }

  /**
   * The rows of `sources` (null: an empty row) with room for `need` positions each: their own cache
   * where they are all of its rows in order and it is wide enough (a prompt's next chunk after its
   * last), else a copy with room up to `maxWidth`.
   */
  private async rowsWithRoom(
    sources: (RowSource | null)[],
    need: number,
    maxWidth: number,
    rowCapacity: number,
  ): Promise<BatchCache> {
    const own = sources[0]?.cache;
    const whole = own && own.lengths.length === sources.length && need <= own.width &&
      sources.every((s, b) => s?.cache === own && s.row === b && sourceLength(s) === own.lengths[b]);
    if (whole) return own;
    const empty = asBatch(this.emptyCache());
    const rows = sources.map((s) => s ?? { cache: empty, row: 0 });
    return await packRows(this.rt, this.graph, rows, headroom(need + 1, maxWidth), rowCapacity);
  }

  /** A row as a sequence's own cache: the row itself where it is its cache's only one, else a copy. */
  private async single(from: RowSource): Promise<KvCache> {
    const length = sourceLength(from);
    if (from.cache.lengths.length === 1 && from.row === 0 && length === from.cache.lengths[0]) {
      return { length, tensors: from.cache.tensors };
    }
    return { length, tensors: (await packRows(this.rt, this.graph, [from])).tensors };
  }

  /**
   * A batch cache of `sources`' rows (see kv_batch.ts packRows), in this session's tensors. `maxWidth`:
   * it is a batch about to decode, given room up to that width to write its next positions in place
   * where steps do, and buffers for `rowCapacity` rows.
   */
  packRows(sources: RowSource[], maxWidth = 0, rowCapacity = sources.length): Promise<BatchCache> {
    if (!maxWidth || !this.inPlace) return packRows(this.rt, this.graph, sources);
    const longest = Math.max(0, ...sources.map(sourceLength));
    return packRows(this.rt, this.graph, sources, headroom(longest + 1, maxWidth), rowCapacity);
  }

  /**
   * A batch's rows after some leave and others join, for a batch engine: `cache` (consumed; null when
   * nothing decodes) without its rows `drop`, then `join` appended. Where steps write in place, a
   * leaving row is overwritten by the last one and joining rows are copied into the room the buffers
   * have (`spare` rows are given when they are redrawn): a join or a leave copies the rows it moves,
   * not the batch; a batch begins in a prefill run's own cache where it can (startFrom). Returns the cache (null when no row is left), for each of its rows the row it
   * was (an index into the old rows, then the joining ones), and whether its buffers are new.
   */
  async regroupRows(
    cache: BatchCache | null,
    drop: number[],
    join: RowSource[],
    maxWidth: number,
    spare = 0,
  ): Promise<{ cache: BatchCache | null; from: number[]; redrawn: boolean }> {
    const rows = cache?.lengths.length ?? 0;
    const joined = join.map((_, j) => rows + j);
    if (!cache && this.inPlace) {
      const started = await this.startFrom(join);
      if (started) return { ...started, redrawn: true };
    }
    let stay: RowSource[];
    let from: number[];
    if (cache && this.inPlace) {
      const left = dropRows(this.rt, cache, drop);
      if (!join.length) {
        return { cache: left.from.length ? left.cache : null, from: left.from, redrawn: false };
      }
      from = [...left.from, ...joined];
      const grown = await appendRows(this.rt, left.cache, join);
      if (grown) return { cache: grown, from, redrawn: false };
      stay = left.from.map((_, row) => ({ cache: left.cache, row }));
    } else {
      const kept = Array.from({ length: rows }, (_, row) => row).filter((row) => !drop.includes(row));
      stay = kept.map((row) => ({ cache: cache!, row }));
      from = [...kept, ...joined];
    }
    // Rows wider than the batch, no room, or steps that do not write in place: the batch is redrawn.
    const sources = [...stay, ...join];
    if (!sources.length) return { cache: null, from: [], redrawn: true };
    return { cache: await this.packRows(sources, maxWidth, sources.length + spare), from, redrawn: true };
  }

  /**
   * A batch begun from `join` without a redraw: the cache of a prefill run whose rows all join (the
   * most rows where several do), with the other joiners copied into its room; null where none has
   * room for them all.
   */
  private async startFrom(join: RowSource[]): Promise<{ cache: BatchCache; from: number[] } | null> {
    const longest = Math.max(...join.map(sourceLength));
    const whole = [...new Set(join.map((s) => s.cache))].filter((c) => {
      const rows = join.filter((s) => s.cache === c);
      return rows.length === c.lengths.length && new Set(rows.map((s) => s.row)).size === rows.length &&
        rows.every((s) => sourceLength(s) === c.lengths[s.row]) &&
        (c.capacity ?? c.lengths.length) >= join.length && c.width >= longest;
    });
    if (!whole.length) return null;
    const own = whole.reduce((a, b) => b.lengths.length > a.lengths.length ? b : a);
    const first = own.lengths.map((_, row) => join.findIndex((s) => s.cache === own && s.row === row));
    const rest = join.map((_, j) => j).filter((j) => join[j].cache !== own);
    if (!rest.length) return { cache: own, from: first };
    const grown = await appendRows(this.rt, own, rest.map((j) => join[j]));
    return grown && { cache: grown, from: [...first, ...rest] };
  }

  /** The cache, or a wider copy of it (at most `maxWidth` unless it needs more), with room for `tokens` more positions in every row. */
  private async withRoom(cache: BatchCache, tokens: number, maxWidth = Infinity): Promise<BatchCache> {
    const need = Math.max(...cache.lengths) + tokens;
    if (need <= cache.width) return cache;
    const rows = cache.lengths.map((_, row) => ({ cache, row }));
    return await packRows(this.rt, this.graph, rows, headroom(need, maxWidth), cache.capacity);
  }

  /**
   * Writes the positions a step computed into its caches: `counts[b]` of row b (of the `width` it ran,
   * its first), after the row's length.
   */
  private writeNew(
    out: ort.InferenceSession.OnnxValueMapType,
    cache: BatchCache,
    counts: number[],
    width: number,
  ): void {
    const hd = this.graph.headDim;
    for (const { layer, kvHeads } of this.graph.cache) {
      for (const [from, to] of [[newKey(layer), pastKey(layer)], [newValue(layer), pastValue(layer)]]) {
        const src = out[from].data as Float32Array;
        const dst = cache.tensors.get(to)!.data as Float32Array;
        // Element by element: a view a row and head would be hundreds of short-lived objects a step.
        for (let b = 0; b < counts.length; b++) {
          const run = counts[b] * hd;
          for (let h = 0; h < kvHeads; h++) {
            const i = b * kvHeads + h;
            const to = (i * cache.width + cache.lengths[b]) * hd;
            const at = i * width * hd;
            for (let e = 0; e < run; e++) dst[to + e] = src[at + e];
          }
        }
        freeHostArray(src);
      }
    }
  }

  /** The sampling inputs of a step drawing `draws`' rows from the graph's exponentials. */
  private drawFeeds(draws: StepDraws): Record<string, ort.Tensor> {
    const n = draws.rows.length;
    return {
      sample_rows: new this.rt.Tensor("int32", Int32Array.from(draws.rows), [n]),
      inverse_temperature: new this.rt.Tensor("float32", Float32Array.from(draws.inverseTemperature), [n]),
    };
  }

  /**
   * Runs the graph; `want` says whether the logits and the sampling exponentials are fetched (each
   * output fetched is copied out of onnxruntime: 4 MB of logits a step of 8 rows at 128K tokens).
   */
  private async run(
    feeds: Record<string, ort.Tensor>,
    cache: Map<string, ort.Tensor>,
    want = { logits: true, probs: false },
  ): Promise<ort.InferenceSession.OnnxValueMapType> {
    await yieldIfBusy();
    if (this.released) throw new Error("session was released");
    for (const [name, tensor] of cache) feeds[name] = tensor;
    if (this.embedding) Object.assign(feeds, this.embedding.feeds(this.rt, feeds.input_ids));
    if (this.graph.sampling && !feeds.sample_rows) {
      Object.assign(feeds, this.drawFeeds({ rows: [], inverseTemperature: [], logits: true }));
    }
    const fetches = [...this.cacheOutputs];
    if (want.logits) fetches.push("logits");
    if (want.probs) fetches.push("sample_probs");
    return await this.session.run(feeds, fetches);
  }

  /** The step's present K/V, renamed as the next step's past. */
  private presents(out: ort.InferenceSession.OnnxValueMapType): Map<string, ort.Tensor> {
    const tensors = new Map<string, ort.Tensor>();
    for (const { layer } of this.graph.cache) {
      tensors.set(pastKey(layer), out[presentKey(layer)]);
      tensors.set(pastValue(layer), out[presentValue(layer)]);
    }
    return tensors;
  }

  private async runStep(input: StepInput, cache: KvCache, rows: LogitRows): Promise<TensorStepResult> {
    const t = Array.isArray(input) ? input.length : 1;
    const total = cache.length + t;
    const past = this.inPlace ? await this.withRoom(asBatch(cache), t) : asBatch(cache);
    const out = await this.run({
      input_ids: Array.isArray(input)
        ? new this.rt.Tensor("int32", Int32Array.from(input), [1, t])
        : ort.Tensor.fromGpuBuffer(input, { dataType: "int32", dims: [1, 1] }),
      ...lengthFeeds(this.rt, [total]),
      logit_positions: logitPositions(this.rt, 1, t, rows),
      // A first run reads no cache: given the room it writes into, its queries would be scored against
      // every position of it, masked (a third of tiny-nas' 128-token prompt run on native onnxruntime).
    }, this.inPlace && cache.length === 0 ? emptyPast(this.rt, this.graph) : past.tensors);
    if (this.inPlace) {
      this.writeNew(out, past, [t], t);
      return { logits: out.logits, cache: { length: total, tensors: new Map(past.tensors) } };
    }
    disposeCache(cache);
    return { logits: out.logits, cache: { length: total, tensors: this.presents(out) } };
  }

  /** Waits for runs in flight, then frees the session's memory (GPU buffers included). */
  async release(): Promise<void> {
    this.released = true;
    await this.chain;
    await this.session.release();
    this.embedding?.close();
  }
}

/**
 * The attention a device's graphs are built with: the host devices' fp32 graphs take the MatMul form
 * (matmul_attention.ts), which onnxruntime-web's WASM kernels run 7-20x faster than the fused operator
 * once a run holds many positions, and native onnxruntime faster in batches and at length, where its
 * fused operator copies every row's cache into a present each layer, at some cost to a small model's
 * lone step (bench/results/2026-12-05-cpu-attention-in-place.txt); WebGPU and fp16 graphs keep the
 * fused operator.
 */
export function attentionFor(device: Backend, dtype: FloatType): AttentionForm {
  return onHost(device) && dtype === "fp32" ? "matmul" : "fused";
}

/** The devices whose sessions run on the host's CPU (WASM, native onnxruntime) and whose engine draws there. */
const onHost = (device: Backend): boolean => device === "wasm" || device === "cpu";

/**
 * Vocabularies from this size get the softmax of sampled rows in their host graphs
 * (DecoderGraph.sampling): at 128K tokens JS took ~1 ms a row, at tiny-nas' 4096 ~0.02 ms, about what
 * the extra nodes, inputs and output cost a step of a small model, so small vocabularies keep JS's.
 */
export const GRAPH_SAMPLING_VOCAB = 32768;

/** Whether a device's graphs compute the softmax a host engine draws from (DecoderGraph.sampling). */
export function samplesInGraph(device: Backend, vocabSize: number): boolean {
  return onHost(device) && vocabSize >= GRAPH_SAMPLING_VOCAB;
}

/** Empty past K/V for each cached layer of a decoder graph: what `rows` sequences start from. */
export function emptyPast(
  rt: OrtApi,
  graph: Pick<DecoderGraph, "cache" | "headDim" | "floatType">,
  rows = 1,
): Map<string, ort.Tensor> {
  const tensors = new Map<string, ort.Tensor>();
  for (const { layer, kvHeads } of graph.cache) {
    const dims = [rows, kvHeads, 0, graph.headDim];
    const empty = () =>
      graph.floatType === "float16"
        ? new rt.Tensor("float16", new Uint16Array(0), dims)
        : new rt.Tensor("float32", new Float32Array(0), dims);
    tensors.set(pastKey(layer), empty());
    tensors.set(pastValue(layer), empty());
  }
  return tensors;
}

/**
 * GroupQueryAttention's lengths for a step after which row b holds `after[b]` tokens: `seqlens_k`
 * (each minus one, where the row's last new token goes) and `total_sequence_length` (the longest).
 */
export function lengthFeeds(rt: OrtApi, after: number[]): Record<string, ort.Tensor> {
  return {
    seqlens_k: new rt.Tensor("int32", Int32Array.from(after, (n) => n - 1), [after.length]),
    total_sequence_length: new rt.Tensor("int32", Int32Array.of(Math.max(...after)), []),
  };
}

/** The flat positions of a [batch, seq] step whose logits are wanted: every one, or each row's last. */
export function logitPositions(rt: OrtApi, batch: number, seq: number, rows: LogitRows): ort.Tensor {
  const at = flatPositions(Array(batch).fill(seq), seq, rows);
  return new rt.Tensor("int32", at, [batch, rows === "all" ? seq : 1]);
}

/**
 * The flat positions of a [counts.length, width] run whose rows hold `counts[b]` real tokens each:
 * each row's last, or every real one, row after row ([1, their sum]).
 */
export function raggedLogitPositions(
  rt: OrtApi,
  counts: number[],
  width: number,
  rows: LogitRows,
): ort.Tensor {
  const at = flatPositions(counts, width, rows);
  return new rt.Tensor("int32", at, rows === "all" ? [1, at.length] : [counts.length, 1]);
}

function flatPositions(counts: number[], width: number, rows: LogitRows): Int32Array {
  const at: number[] = [];
  counts.forEach((n, b) => {
    for (let i = rows === "all" ? 0 : n - 1; i < n; i++) at.push(b * width + i);
  });
  return Int32Array.from(at);
}

/** A single sequence's cache seen as a batch of one row. */
export function asBatch(cache: KvCache): BatchCache {
  const width = cache.tensors.values().next().value?.dims[2] ?? cache.length;
  return { width, lengths: [cache.length], tensors: cache.tensors };
}

/** Frees GPU-resident cache tensors; CPU ones are left to the garbage collector. */
export function disposeCache(cache: KvCache): void {
  for (const t of cache.tensors.values()) {
    if (t.location === "gpu-buffer") t.dispose();
  }
  cache.tensors.clear();
}

/**
 * Runs `use` on an fp32 session of a block list (a candidate plan being scored, a fit being measured),
 * WASM unless told otherwise, and frees the session however `use` ends.
 */
export async function withScoringSession<T>(
  ckpt: Checkpoint,
  blocks: Block[],
  use: (session: ModelSession) => Promise<T>,
  device: Backend = "wasm",
): Promise<T> {
  const graph = buildDecoderGraph(ckpt, blocks, undefined, undefined, {
    attention: attentionFor(device, "fp32"),
  });
  const session = await ModelSession.create(graph, device, ckpt.config.vocabSize);
  try {
    return await use(session);
  } finally {
    await session.release();
  }
}
