// Reads a large buffer once, as wide loads, and reduces it: the adapter's streaming-read bandwidth,
// the ceiling the FFN kernels' achieved bandwidth is compared with.

struct Params {
  count: u32,
  stride: u32,
  _pad0: u32,
  _pad1: u32,
}

@group(0) @binding(0) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> sink: array<f32>;
@group(0) @binding(2) var<uniform> p: Params;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  var acc = vec4<f32>(0.0);
  for (var i = gid.x; i < p.count; i += p.stride) {
    acc += src[i];
  }
  // Written only when the sum is impossible, so the loads cannot be optimised away.
  if (acc.x == -1.0e30) {
    sink[gid.x] = acc.y;
  }
}
