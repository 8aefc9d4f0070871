// out[t, j] = res[t, j] + h[t, :] . Wd[j, :]: the down projection with the residual add in the
// epilogue. Wd rows have length n (the FFN width; for a fused group, the members' widths summed).
// gemv: one workgroup per output column j, single token. gemm: 16 x 16 tiles for batches.

struct Params {
  n: u32,
  d: u32,
  tokens: u32,
  _pad: u32,
}

@group(0) @binding(0) var<storage, read> h: array<f32>;
// Weights are read four at a time (8 or 16 bytes per load); rows have n % 4 == 0 elements.
@group(0) @binding(1) var<storage, read> wd: array<vec4<WT>>;
@group(0) @binding(2) var<storage, read> res: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

var<workgroup> partial: array<f32, 64>;

@compute @workgroup_size(64)
fn gemv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let j = wid.x;
  let wbase = j * (p.n / 4u);
  var acc = 0.0;
  for (var i = lid; i < p.n / 4u; i += 64u) {
    let hv = vec4<f32>(h[4u * i], h[4u * i + 1u], h[4u * i + 2u], h[4u * i + 3u]);
    acc += dot(hv, vec4<f32>(wd[wbase + i]));
  }
  partial[lid] = acc;
  workgroupBarrier();
  for (var s = 32u; s > 0u; s >>= 1u) {
    if (lid < s) {
      partial[lid] += partial[lid + s];
    }
    workgroupBarrier();
  }
  if (lid == 0u) {
    out[j] = res[j] + partial[0];
  }
}

var<workgroup> hs: array<array<f32, 16>, 16>;
var<workgroup> ws: array<array<f32, 16>, 16>;

@compute @workgroup_size(16, 16)
fn gemm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
  let t = wid.y * 16u + l.y;
  let j = wid.x * 16u + l.x;
  var acc = 0.0;
  for (var k0 = 0u; k0 < p.n; k0 += 16u) {
    let ht = wid.y * 16u + l.y;
    let wr = wid.x * 16u + l.y;
    hs[l.y][l.x] = select(0.0, h[ht * p.n + k0 + l.x], ht < p.tokens && k0 + l.x < p.n);
    let wi = min(wr * p.n + k0 + l.x, p.d * p.n - 1u);
    ws[l.y][l.x] = select(0.0, f32(wd[wi / 4u][wi % 4u]), wr < p.d && k0 + l.x < p.n);
    workgroupBarrier();
    for (var k = 0u; k < 16u; k++) {
      acc += hs[l.y][k] * ws[l.x][k];
    }
    workgroupBarrier();
  }
  if (t < p.tokens && j < p.d) {
    out[t * p.d + j] = res[t * p.d + j] + acc;
  }
}
