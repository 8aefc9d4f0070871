// Picks the next token on the GPU from one row of logits, so a decode step needs no readback:
// greedy argmax, or with temperature the Gumbel-max trick (argmax of logits / T + Gumbel noise,
// an exact sample from softmax(logits / T)) with noise hashed from (seed, step, token id).
// Writes the id as the next step's int32 input_ids and appends it to the history buffer that the
// host reads back in batches.

struct Params {
  offset: u32,
  vocab: u32,
  step: u32,
  seed: u32,
  inv_temperature: f32,
  sample: u32,
  _pad0: u32,
  _pad1: u32,
}

@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read_write> next_ids: array<u32>;
@group(0) @binding(2) var<storage, read_write> history: array<u32>;
@group(0) @binding(3) var<uniform> p: Params;

var<workgroup> best_v: array<f32, 256>;
var<workgroup> best_i: array<u32, 256>;

fn hash(x: u32) -> u32 {
  var h = x;
  h ^= h >> 16u;
  h *= 0x7feb352du;
  h ^= h >> 15u;
  h *= 0x846ca68bu;
  h ^= h >> 16u;
  return h;
}

fn score(i: u32) -> f32 {
  let l = logits[p.offset + i];
  if (p.sample == 0u) {
    return l;
  }
  let bits = hash(hash(p.seed ^ (p.step * 0x9e3779b9u)) ^ i);
  let u = (f32(bits >> 8u) + 0.5) / 16777216.0;
  return l * p.inv_temperature - log(-log(u));
}

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32) {
  var v = -3.4e38;
  var idx = 0xffffffffu;
  for (var i = lid; i < p.vocab; i += 256u) {
    let s = score(i);
    if (s > v) {
      v = s;
      idx = i;
    }
  }
  best_v[lid] = v;
  best_i[lid] = idx;
  workgroupBarrier();
  for (var s = 128u; s > 0u; s >>= 1u) {
    if (lid < s) {
      let ov = best_v[lid + s];
      let oi = best_i[lid + s];
      if (ov > best_v[lid] || (ov == best_v[lid] && oi < best_i[lid])) {
        best_v[lid] = ov;
        best_i[lid] = oi;
      }
    }
    workgroupBarrier();
  }
  if (lid == 0u) {
    next_ids[0] = best_i[0];
    history[p.step] = best_i[0];
  }
}
