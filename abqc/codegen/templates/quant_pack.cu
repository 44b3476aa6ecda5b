// abqc activation path: per-token dynamic quantization and bit-plane packing in one pass.
// The generator prepends Q (activation bits). One block per token; x is read twice (range, codes),
// codes never touch memory: each warp turns 32 codes into Q words with __ballot_sync
// (lane l -> bit l, the canonical LSB-first layout). Same float32 arithmetic as abqc.quant, so the
// codes equal the CPU reference's.
typedef unsigned int u32;
typedef long long i64;

struct QArgs {
  const void *x; int in_dtype;        // 1 f32, 2 f16, 3 bf16; x is [M][K] contiguous
  int M, K, KW, gw, G, symmetric;
  u32 *planes;                        // [Q][M][KW]
  int *sums;                          // [M][G] code sums per group
  float *scale; int *zero;            // [M]
};

__device__ __forceinline__ float load_x(const QArgs &a, i64 i) {
  if (a.in_dtype == 1) return ((const float *)a.x)[i];
  unsigned short h = ((const unsigned short *)a.x)[i];
  float v;
  if (a.in_dtype == 2) asm("cvt.f32.f16 %0, %1;" : "=f"(v) : "h"(h));
  else v = __uint_as_float(((u32)h) << 16);
  return v;
}

extern "C" __global__ void __launch_bounds__(1024) KERNEL_NAME(const QArgs a) {
  // shared memory: the token's row as float [K] (read from HBM once), then group code sums [G]
  extern __shared__ float xs[];
  int *gsum = (int *)(xs + a.K);
  __shared__ float smin[32], smax[32];
  const int m = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const i64 base = (i64)m * a.K;
  for (int gi = threadIdx.x; gi < a.G; gi += blockDim.x) gsum[gi] = 0;
  float lo = __int_as_float(0x7f800000), hi = __int_as_float(0xff800000);
  // 8 independent loads in flight per thread before any is used
  for (int k0 = threadIdx.x; k0 < a.K; k0 += 8 * blockDim.x) {
    float v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int k = k0 + u * blockDim.x;
      v[u] = k < a.K ? load_x(a, base + k) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int k = k0 + u * blockDim.x;
      if (k < a.K) { xs[k] = v[u]; lo = fminf(lo, v[u]); hi = fmaxf(hi, v[u]); }
    }
  }
  for (int o = 16; o; o >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
  if (lane == 0) { smin[warp] = lo; smax[warp] = hi; }
  __syncthreads();
  lo = smin[0]; hi = smax[0];
  for (int w = 1; w < nwarps; ++w) { lo = fminf(lo, smin[w]); hi = fmaxf(hi, smax[w]); }
  const int qmax = (1 << Q) - 1;
  float scale, zero;
  if (a.symmetric) {
    const float absmax = fmaxf(fabsf(hi), fabsf(lo));
    scale = fmaxf(absmax / (float)((1 << (Q - 1)) - 1), 1e-8f);
    zero = (float)(1 << (Q - 1));
  } else {
    const float mn = fminf(lo, 0.f), mx = fmaxf(hi, 0.f);
    scale = fmaxf((mx - mn) / (float)qmax, 1e-8f);
    zero = fminf(fmaxf(rintf(-mn / scale), 0.f), (float)qmax);
  }
  if (threadIdx.x == 0) { a.scale[m] = scale; a.zero[m] = (int)zero; }
  // each warp packs a contiguous run of words and keeps its code sum in registers until the group
  // changes: one shared atomic per (warp, group) instead of one per word
  const int per = (a.KW + nwarps - 1) / nwarps, w_begin = warp * per, w_end = min(a.KW, w_begin + per);
  int lsum = 0, cur_group = w_begin / a.gw;
  for (int w = w_begin; w < w_end; ++w) {
    if (w / a.gw != cur_group) {
      for (int o = 16; o; o >>= 1) lsum += __shfl_xor_sync(0xffffffffu, lsum, o);
      if (lane == 0) atomicAdd(&gsum[cur_group], lsum);
      lsum = 0; cur_group = w / a.gw;
    }
    const int k = w * 32 + lane;
    int u = 0;
    if (k < a.K) u = (int)fminf(fmaxf(rintf(xs[k] / scale) + zero, 0.f), (float)qmax);
    u32 mine = 0;   // lane j keeps plane j's word and stores it: Q stores in parallel
#pragma unroll
    for (int j = 0; j < Q; ++j) {
      const u32 bits = __ballot_sync(0xffffffffu, (u >> j) & 1);
      if (lane == j) mine = bits;
    }
    if (lane < Q) a.planes[((i64)lane * a.M + m) * a.KW + w] = mine;
    lsum += u;
  }
  if (w_begin < w_end) {
    for (int o = 16; o; o >>= 1) lsum += __shfl_xor_sync(0xffffffffu, lsum, o);
    if (lane == 0) atomicAdd(&gsum[cur_group], lsum);
  }
  __syncthreads();
  for (int gi = threadIdx.x; gi < a.G; gi += blockDim.x) a.sums[(i64)m * a.G + gi] = gsum[gi];
}
