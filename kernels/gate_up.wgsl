// h[t, n] = silu(x[t, :] . Wg[n, :]) * (x[t, :] . Wu[n, :]): the gate and up projections of a
// SwiGLU FFN with the activation applied in the epilogue, so h is written once and never re-read
// in between. Weights are WT (f32, or f16 with f32 accumulation), rows of length d.
// gemv: one workgroup per output row, for a single token (decode).
// gemm: 16 x 16 output tiles (tokens x rows) through workgroup memory, for prefill batches.

struct Params {
  d: u32,
  n: u32,
  tokens: u32,
  rows_per_dispatch_x: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
// Weights are read four at a time (8 or 16 bytes per load); rows have d % 4 == 0 elements.
@group(0) @binding(1) var<storage, read> wg: array<vec4<WT>>;
@group(0) @binding(2) var<storage, read> wu: array<vec4<WT>>;
@group(0) @binding(3) var<storage, read_write> h: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

fn silu(v: f32) -> f32 {
  return v / (1.0 + exp(-v));
}

var<workgroup> pg: array<f32, 64>;
var<workgroup> pu: array<f32, 64>;

@compute @workgroup_size(64)
fn gemv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let row = wid.x + wid.y * p.rows_per_dispatch_x;
  if (row >= p.n) {
    return;
  }
  let wbase = row * (p.d / 4u);
  var ag = 0.0;
  var au = 0.0;
  for (var i = lid; i < p.d / 4u; i += 64u) {
    let xv = vec4<f32>(x[4u * i], x[4u * i + 1u], x[4u * i + 2u], x[4u * i + 3u]);
    ag += dot(xv, vec4<f32>(wg[wbase + i]));
    au += dot(xv, vec4<f32>(wu[wbase + i]));
  }
  pg[lid] = ag;
  pu[lid] = au;
  workgroupBarrier();
  for (var s = 32u; s > 0u; s >>= 1u) {
    if (lid < s) {
      pg[lid] += pg[lid + s];
      pu[lid] += pu[lid + s];
    }
    workgroupBarrier();
  }
  if (lid == 0u) {
    h[row] = silu(pg[0]) * pu[0];
  }
}

var<workgroup> xs: array<array<f32, 16>, 16>;
var<workgroup> gs: array<array<f32, 16>, 16>;
var<workgroup> us: array<array<f32, 16>, 16>;

@compute @workgroup_size(16, 16)
fn gemm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
  let t = wid.y * 16u + l.y;
  let n = wid.x * 16u + l.x;
  var ag = 0.0;
  var au = 0.0;
  for (var k0 = 0u; k0 < p.d; k0 += 16u) {
    // Thread (x, y) loads x[tile token y][k0 + x] and weight rows (tile row y, column k0 + x).
    let xt = wid.y * 16u + l.y;
    let wr = wid.x * 16u + l.y;
    xs[l.y][l.x] = select(0.0, x[xt * p.d + k0 + l.x], xt < p.tokens && k0 + l.x < p.d);
    let inside = wr < p.n && k0 + l.x < p.d;
    let wi = min(wr * p.d + k0 + l.x, p.n * p.d - 1u);
    gs[l.y][l.x] = select(0.0, f32(wg[wi / 4u][wi % 4u]), inside);
    us[l.y][l.x] = select(0.0, f32(wu[wi / 4u][wi % 4u]), inside);
    workgroupBarrier();
    for (var k = 0u; k < 16u; k++) {
      ag += xs[l.y][k] * gs[l.x][k];
      au += xs[l.y][k] * us[l.x][k];
    }
    workgroupBarrier();
  }
  if (t < p.tokens && n < p.n) {
    h[t * p.n + n] = silu(ag) * au;
  }
}
