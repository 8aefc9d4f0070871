import type { GraphBuilder } from "./builder.ts";

/**
 * Attention from standard operators (MatMul, Softmax, Concat) for caches kept in place on the host
 * (DecoderGraph.newKv): packed q/k/v in, rotary at each row's own positions, each query attending to
 * its row's cached positions and to the step's new ones up to itself. Its outputs are the step's own
 * keys and values (`new.{i}.*`), which the session writes into its caches; there are no presents, and
 * the caches are only read: scores against the cached keys and against the step's own are computed
 * apart and joined (a few floats a query), and so are the two halves of the context.
 *
 * Why not the fused operator on the host: onnxruntime-web's WASM kernel of GroupQueryAttention costs
 * ~140 ns per query, key and head, 7-20x more than these operators once a run holds many positions
 * (bench/results/2026-12-04-wasm-attention-forms.txt), and on both host devices the kernel copies
 * every row's cache into a new present each layer unless the present shares the past's buffer, which
 * Deno would hand back as a copy of its own (bench/results/2026-12-05-cpu-attention-in-place.txt).
 */

/** ONNX TensorProto type number of int64, for Cast. */
const INT64 = 7;

/** A masked score: finite, so that a row's max subtraction never meets -inf - -inf. */
const MASKED = -3.0e38;

/** Past positions at or past a row's length: further than any query, so never seen. */
const UNSEEN = 2 ** 40;

/** Values a step's attention layers share, emitted once before the first layer. */
export interface StepPositions {
  /** int64 [batch, seq]: each new token's position in its row. */
  positions: string;
  /** float [batch, 1, 1, seq, past + seq]: 0 where a query sees a key (past, then new), MASKED elsewhere. */
  mask: string;
  /** int64 [2]: past and seq, where the mask's last axis splits between cached and new keys. */
  parts: string;
}

/**
 * The shared values from the step's inputs: `ids` [batch, seq], `seqlensK` (each row's length after
 * the step, minus one) and one layer's past [batch, h, past, d], whose positions from each row's
 * length on are room, not cache.
 */
export function stepPositions(
  g: GraphBuilder,
  ids: string,
  seqlensK: string,
  anyPast: string,
): StepPositions {
  const range = (n: string) => g.op("Range", [g.ints([0], true), g.op("Squeeze", [n]), g.ints([1], true)]);
  const seq = g.op("Shape", [ids], { start: 1, end: 2 });
  const lengths = g.op("Sub", [g.op("Add", [g.op("Cast", [seqlensK], { to: INT64 }), g.ints([1])]), seq]);
  const cached = g.op("Unsqueeze", [lengths, g.ints([1])]);
  const positions = g.op("Add", [cached, range(seq)]);
  // Each key's position in its row: the past's own index while it is cache, then the new positions.
  const width = g.op("Shape", [anyPast], { start: 2, end: 3 });
  const past = range(width);
  const pastAt = g.op("Where", [g.op("Less", [past, cached]), past, g.ints([UNSEEN], true)]);
  const keyAt = g.op("Concat", [pastAt, positions], { axis: 1 });
  const seen = g.op("LessOrEqual", [
    g.op("Unsqueeze", [keyAt, g.ints([1])]),
    g.op("Unsqueeze", [positions, g.ints([2])]),
  ]);
  const mask = g.op("Unsqueeze", [g.op("Where", [seen, g.scalar(0), g.scalar(MASKED)]), g.ints([1, 2])]);
  return { positions, mask, parts: g.op("Concat", [width, seq], { axis: 0 }) };
}

export interface AttentionShape {
  numHeads: number;
  kvHeads: number;
  headDim: number;
}

/**
 * One layer's attention: `qkv` [batch, seq, (heads + 2 kvHeads) headDim] to its context [batch, seq,
 * heads headDim]; the step's keys (rotated) and values [batch, kvHeads, seq, headDim] come out under
 * the names given.
 */
export function matmulAttention(
  g: GraphBuilder,
  qkv: string,
  shape: AttentionShape,
  step: StepPositions,
  rotary: { cos: string; sin: string },
  cache: { pastKey: string; pastValue: string; newKey: string; newValue: string },
): string {
  const { numHeads: h, kvHeads: kv, headDim: d } = shape;
  const group = h / kv;
  const [q, k, v] = g.node("Split", [qkv, g.ints([h * d, kv * d, kv * d])], { axis: 2 }, 3);
  const rotate = (x: string, heads: number) =>
    g.node(
      "RotaryEmbedding",
      [x, step.positions, rotary.cos, rotary.sin],
      { num_heads: heads },
      1,
      "com.microsoft",
    )[0];
  // Query heads that share a key head become one batch of rows: [batch, kv, group, seq, d].
  const queries = g.op("Transpose", [g.op("Reshape", [rotate(q, h), g.ints([0, 0, kv, group, d])])], {
    perm: [0, 2, 3, 1, 4],
  });
  const heads = (x: string, name: string) =>
    g.op("Transpose", [g.op("Reshape", [x, g.ints([0, 0, kv, d])])], { perm: [0, 2, 1, 3] }, name);
  // [batch, kv, 1, positions, d], broadcast over the group. The cache is read where it lies: joining
  // it to the step's keys first copied every row's whole cache each layer and step.
  const grouped = (x: string) => g.op("Unsqueeze", [x, g.ints([2])]);
  const pastKeys = grouped(cache.pastKey);
  const newKeys = grouped(heads(rotate(k, kv), cache.newKey));
  const scored = (keys: string) =>
    g.node(
      "FusedMatMul",
      [queries, keys],
      { transB: 1, alpha: { float: 1 / Math.sqrt(d) } },
      1,
      "com.microsoft",
    )[0];
  const scores = g.op("Concat", [scored(pastKeys), scored(newKeys)], { axis: -1 });
  const probs = g.op("Softmax", [g.op("Add", [scores, step.mask])], { axis: -1 });
  const [pastProbs, newProbs] = g.node("Split", [probs, step.parts], { axis: -1 }, 2);
  const context = g.op("Add", [
    g.op("MatMul", [pastProbs, grouped(cache.pastValue)]),
    g.op("MatMul", [newProbs, grouped(heads(v, cache.newValue))]),
  ]);
  return g.op("Reshape", [g.op("Transpose", [context], { perm: [0, 3, 1, 2, 4] }), g.ints([0, 0, h * d])]);
}
