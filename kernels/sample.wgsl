// Chooses each decoding row's next token on the GPU, so a decode step needs no readback: one
// workgroup per row. The penalties (repetition over prompt and output, OpenAI's presence and
// frequency over the output) adjust the logits as runtime/sampling.ts does; greedy takes the argmax;
// otherwise top-k and top-p keep the tokens at or above a threshold found by bisecting the bits of
// the logits (each step one counting or summing pass over the vocabulary, no sort), and the draw is
// Gumbel-max over the kept tokens with noise hashed from (seed, token index, id): an exact sample of
// softmax(logits / T) renormalised over them. The id goes to `ids[slot]` (the next step's input), to
// the slot's history ring (read back by the host in batches) and to the slot's counts (penalties);
// when asked, the chosen token's log-probability and the n likeliest go to the log-probability ring.
// A constrained row (flag bit 2) reads its slot's token mask, written by the host from the row's
// grammar state: a token whose bit is clear gets a logit far below any real one (finite: WGSL has no
// infinity constant), so no draw, argmax or kept mass ever takes it while the grammar allows any.

struct Row {
  logits_row: u32,
  slot: u32,
  // The token's index in its sequence's output: its place in the rings and its draw.
  index: u32,
  seed: u32,
  temperature: f32,
  top_k: u32,
  top_p: f32,
  repetition: f32,
  presence: f32,
  frequency: f32,
  // bit 0: penalties apply; bit 2: the slot's mask applies; bits 8..15: alternatives reported
  // (0..20) when bit 1 asks for logprobs.
  flags: u32,
  _pad: u32,
}

struct Consts {
  vocab: u32,
  ring: u32,
  _pad0: u32,
  _pad1: u32,
}

@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read> rows: array<Row>;
// Per slot and id: bit 31 set when the id is in the prompt, the low bits how often it was generated.
@group(0) @binding(2) var<storage, read_write> counts: array<u32>;
@group(0) @binding(3) var<storage, read_write> ids: array<i32>;
@group(0) @binding(4) var<storage, read_write> history: array<u32>;
// Per slot and ring entry, LP_STRIDE words: the chosen token's log-probability, then 20 (id, logprob).
@group(0) @binding(5) var<storage, read_write> lp: array<u32>;
@group(0) @binding(6) var<uniform> c: Consts;
// Per slot, one bit per id (ceil(vocab / 32) words): set where the slot's grammar allows the id.
@group(0) @binding(7) var<storage, read> masks: array<u32>;

const WG: u32 = 256u;
const PROMPT: u32 = 0x80000000u;
const LP_STRIDE: u32 = 41u;

var<workgroup> red_f: array<f32, 256>;
var<workgroup> red_u: array<u32, 256>;

fn hash(x: u32) -> u32 {
  var h = x;
  h ^= h >> 16u;
  h *= 0x7feb352du;
  h ^= h >> 15u;
  h *= 0x846ca68bu;
  h ^= h >> 16u;
  return h;
}

// A total order of the floats as unsigned integers: bisection over these bits finds thresholds.
fn key(x: f32) -> u32 {
  let b = bitcast<u32>(x);
  return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

const MASKED: f32 = -3.0e38;

// An Exp(1) variate from the top 23 bits of `bits`: -log(1 - w), w on a grid of 2^-23 steps strictly
// inside (0, 1), so the Gumbel noise -log(E) stays within [-2.82, 16.64]. A grid of 2^-24 steps does not
// fit an f32 beside its half-step offset: its top value rounds to u = 1, whose noise is +inf and
// beats any logit and the mask (once in 2^24 / vocab draws: every ~130th token of a 128K vocabulary
// was uniformly random, and a constrained row broke its grammar). Near w = 0, log(1 - w) may be off by
// as much as its value (WGSL allows 2^-21 absolute error on [0.5, 2]), so a series takes over there.
fn exponential(bits: u32) -> f32 {
  let w = (f32(bits >> 9u) + 0.5) * (1.0 / 8388608.0);
  if (w < 0.0009765625) {
    return w * (1.0 + w * (0.5 + w * 0.33333334));
  }
  return -log(1.0 - w);
}

fn adjusted(r: Row, i: u32) -> f32 {
  if ((r.flags & 4u) != 0u) {
    let words = (c.vocab + 31u) / 32u;
    if ((masks[r.slot * words + i / 32u] & (1u << (i % 32u))) == 0u) {
      return MASKED;
    }
  }
  var l = logits[r.logits_row * c.vocab + i];
  if ((r.flags & 1u) != 0u) {
    let n = counts[r.slot * c.vocab + i];
    if (n != 0u) {
      if (r.repetition != 1.0) {
        l = select(l * r.repetition, l / r.repetition, l > 0.0);
      }
      let generated = f32(n & ~PROMPT);
      if (generated > 0.0) {
        l -= r.presence + r.frequency * generated;
      }
    }
  }
  return l;
}

fn sum_f(lid: u32, v: f32) -> f32 {
  red_f[lid] = v;
  workgroupBarrier();
  for (var s = WG / 2u; s > 0u; s >>= 1u) {
    if (lid < s) {
      red_f[lid] += red_f[lid + s];
    }
    workgroupBarrier();
  }
  let total = workgroupUniformLoad(&red_f[0]);
  workgroupBarrier();
  return total;
}

fn sum_u(lid: u32, v: u32) -> u32 {
  red_u[lid] = v;
  workgroupBarrier();
  for (var s = WG / 2u; s > 0u; s >>= 1u) {
    if (lid < s) {
      red_u[lid] += red_u[lid + s];
    }
    workgroupBarrier();
  }
  let total = workgroupUniformLoad(&red_u[0]);
  workgroupBarrier();
  return total;
}

// The best (value, id) of the workgroup, the lowest id among equal values, as the host's argmax.
fn best(lid: u32, v: f32, i: u32) -> u32 {
  red_f[lid] = v;
  red_u[lid] = i;
  workgroupBarrier();
  for (var s = WG / 2u; s > 0u; s >>= 1u) {
    if (lid < s) {
      let ov = red_f[lid + s];
      let oi = red_u[lid + s];
      if (ov > red_f[lid] || (ov == red_f[lid] && oi < red_u[lid])) {
        red_f[lid] = ov;
        red_u[lid] = oi;
      }
    }
    workgroupBarrier();
  }
  let id = workgroupUniformLoad(&red_u[0]);
  workgroupBarrier();
  return id;
}

// The likeliest kept id after (after_v, after_i) in (value desc, id asc) order.
fn next_best(lid: u32, r: Row, floor: u32, after_v: f32, after_i: u32) -> u32 {
  var v = -3.4e38;
  var idx = 0xffffffffu;
  for (var i = lid; i < c.vocab; i += WG) {
    let a = adjusted(r, i);
    let later = a < after_v || (a == after_v && i > after_i);
    // A masked token is no alternative: the list ends where the allowed ones do.
    let allowed = a != MASKED;
    if (allowed && key(a) >= floor && later && (a > v || (a == v && i < idx))) {
      v = a;
      idx = i;
    }
  }
  return best(lid, v, idx);
}

// The largest threshold t >= floor whose kept count (counting) or kept mass (otherwise) reaches goal.
fn bisect(lid: u32, r: Row, floor: u32, counting: bool, goal: f32, m: f32, t_inv: f32) -> u32 {
  var t = 0u;
  for (var bit = 31i; bit >= 0i; bit--) {
    let cand = max(t | (1u << u32(bit)), floor);
    var n = 0u;
    var mass = 0.0;
    for (var i = lid; i < c.vocab; i += WG) {
      let a = adjusted(r, i);
      if (key(a) >= cand) {
        n += 1u;
        mass += exp((a - m) * t_inv);
      }
    }
    var reached: bool;
    if (counting) {
      reached = f32(sum_u(lid, n)) >= goal;
    } else {
      reached = sum_f(lid, mass) >= goal;
    }
    if (reached) {
      t = t | (1u << u32(bit));
    }
  }
  return max(t, floor);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  // Every invocation loads its row itself (a read-only storage load at a uniform index is uniform), so
  // no invocation depends on another having published it through workgroup memory.
  let r = rows[wid.x];
  let greedy = r.temperature == 0.0;
  let t_inv = select(1.0 / r.temperature, 1.0, greedy);

  var v = -3.4e38;
  var idx = 0u;
  for (var i = lid; i < c.vocab; i += WG) {
    let a = adjusted(r, i);
    if (a > v) {
      v = a;
      idx = i;
    }
  }
  let top = best(lid, v, idx);
  let m = adjusted(r, top);

  var floor = 0u;
  if (!greedy && r.top_k > 0u && r.top_k < c.vocab) {
    floor = bisect(lid, r, 0u, true, f32(r.top_k), m, t_inv);
  }
  if (!greedy && r.top_p < 1.0) {
    var z = 0.0;
    for (var i = lid; i < c.vocab; i += WG) {
      let a = adjusted(r, i);
      if (key(a) >= floor) {
        z += exp((a - m) * t_inv);
      }
    }
    floor = bisect(lid, r, floor, false, r.top_p * sum_f(lid, z), m, t_inv);
  }

  var chosen = top;
  if (!greedy) {
    let draw = hash(r.seed ^ hash(r.index * 0x9e3779b9u + 0x632be5abu));
    var g = -3.4e38;
    var gi = 0xffffffffu;
    for (var i = lid; i < c.vocab; i += WG) {
      let a = adjusted(r, i);
      if (key(a) >= floor) {
        let s = a * t_inv - log(exponential(hash(draw ^ i)));
        if (s > g) {
          g = s;
          gi = i;
        }
      }
    }
    chosen = best(lid, g, gi);
  }

  let entry = r.slot * c.ring + r.index % c.ring;
  if ((r.flags & 2u) != 0u) {
    // Greedy reports the model's own distribution (temperature 1, nothing filtered), as the host does.
    var z = 0.0;
    for (var i = lid; i < c.vocab; i += WG) {
      let a = adjusted(r, i);
      if (key(a) >= floor) {
        z += exp((a - m) * t_inv);
      }
    }
    let norm = m * t_inv + log(sum_f(lid, z));
    let base = entry * LP_STRIDE;
    if (lid == 0u) {
      lp[base] = bitcast<u32>(adjusted(r, chosen) * t_inv - norm);
    }
    let n = (r.flags >> 8u) & 0xffu;
    var after_v = 3.4e38;
    var after_i = 0u;
    for (var k = 0u; k < n; k++) {
      let id = next_best(lid, r, floor, after_v, after_i);
      if (id == 0xffffffffu) {
        break;
      }
      let a = adjusted(r, id);
      if (lid == 0u) {
        lp[base + 1u + 2u * k] = id;
        lp[base + 2u + 2u * k] = bitcast<u32>(a * t_inv - norm);
      }
      after_v = a;
      after_i = id;
    }
    if (lid == 0u && n < 20u) {
      lp[base + 1u + 2u * n] = 0xffffffffu;
    }
  }
  if (lid == 0u) {
    ids[r.slot] = i32(chosen);
    history[entry] = chosen;
    counts[r.slot * c.vocab + chosen] += 1u;
  }
}
