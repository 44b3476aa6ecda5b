// abqc bit-plane GEMM (family "bmma"). The generator prepends the config and common.cuh:
//   P  weight bit-planes, Q activation bit-planes, TM token tiles (of 8) per warp.
// The block's warps (blockDim.x / 32, a launch parameter) split K.
// Binary products use mma.sync m16n8k256 .b1 AND+popc only (XOR and INT4 MMA are emulated on sm_90).
//
// Weights are pre-tiled (abqc.codegen.layout.tile_weights): for every 16-channel tile, K step of
// 256 bits and plane, each lane's four A-fragment words sit in one uint4, so a warp loads 512
// contiguous bytes per plane and step. Activation planes keep the canonical layout [Q][M][KW].
// The product of planes i (weights) and j (activations) is accumulated into acc[i+j]: MMAs chain
// on the accumulator, and 2^(i+j) is applied once per K group when the planes are combined.
#define S_ACC (P + Q - 1)

// One K step (256 bits): all P x Q plane products for TM token tiles. Activation words come from
// shared memory when the block staged them (rows = tokens m0.., stride a.stage_stride), else global.
__device__ __forceinline__ void mma_step(const Args &a, const u32 *xs, int s, int m0, int lane,
                                         const uint4 (&wf)[P], int (&acc)[TM][S_ACC][4]) {
  const int g = lane >> 2, t = lane & 3;
  const int grp = s / a.SG, ws = (s - grp * a.SG) * 8;
  const int w0 = grp * a.gw + ws + t;
  const bool v0 = ws + t < a.gw, v1 = ws + t + 4 < a.gw;
  const int rows = min(8 * TM, a.M - m0);
#pragma unroll
  for (int tm = 0; tm < TM; ++tm) {
    const int ml = tm * 8 + g;
    const bool mv = ml < rows;
#pragma unroll
    for (int j = 0; j < Q; ++j) {
      u32 b0 = 0u, b1 = 0u;
      if (a.stage_stride > 0) {
        const u32 *row = xs + (j * rows + ml) * a.stage_stride;
        if (mv && v0) b0 = row[w0];
        if (mv && v1) b1 = row[w0 + 4];
      } else {
        const u32 *row = a.act + ((i64)j * a.M + m0 + ml) * (a.G * a.gw);
        if (mv && v0) b0 = __ldg(row + w0);
        if (mv && v1) b1 = __ldg(row + w0 + 4);
      }
#pragma unroll
      for (int i = 0; i < P; ++i) bmma_and(acc[tm][i + j], wf[i], b0, b1);
    }
  }
}

// Weight fragments of PF steps are loaded together before their MMAs: enough bytes in flight to
// stream weights at HBM speed with few warps (decode shapes give each warp only a handful of steps).
#define PF_RAW (P >= 7 ? 1 : (P >= 5 ? 2 : (P == 4 ? 3 : (P == 3 ? 4 : 6))))
#define PF (PF_RAW / TM > 0 ? PF_RAW / TM : 1)

__device__ __forceinline__ void load_batch(const Args &a, int nt, int s, int s1, int stride, int lane,
                                           uint4 (&wb)[PF][P]) {
#pragma unroll
  for (int b = 0; b < PF; ++b)
    if (s + b * stride < s1) load_w(a, nt, s + b * stride, lane, wb[b]);
}

// Steps s0, s0+stride, ... < s1 whose first batch of weights `wb` is already loaded.
__device__ __forceinline__ void run_steps(const Args &a, const u32 *xs, int nt, int s0, int s1, int stride,
                                          int m0, int lane, uint4 (&wb)[PF][P], int (&acc)[TM][S_ACC][4]) {
  for (int s = s0; s < s1; s += PF * stride) {
#pragma unroll
    for (int b = 0; b < PF; ++b)
      if (s + b * stride < s1) mma_step(a, xs, s + b * stride, m0, lane, wb[b], acc);
    if (s + PF * stride < s1) load_batch(a, nt, s + PF * stride, s1, stride, lane, wb);
  }
}

__device__ __forceinline__ void zero_acc(int (&acc)[TM][S_ACC][4]) {
#pragma unroll
  for (int tm = 0; tm < TM; ++tm)
#pragma unroll
    for (int s = 0; s < S_ACC; ++s)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[tm][s][r] = 0;
}

__device__ __forceinline__ int combine(const int (&accs)[S_ACC][4], int r) {
  int c = 0;
#pragma unroll
  for (int s = 0; s < S_ACC; ++s) c += accs[s][r] << s;
  return c;
}

// Accumulators plus a batch of prefetched weight fragments need more than the 128 registers ptxas
// settles on for two blocks per SM; one block per SM (up to 255 registers) keeps them out of local
// memory (checked in CI: no LDL/STL in any build).
#define BMMA_BOUNDS __launch_bounds__(256, 1)

extern "C" __global__ void BMMA_BOUNDS KERNEL_NAME(const Args a) {
  // shared memory: [WK][32][TM*4] reduction partials, then the staged activation rows [Q][rows][stride]
  extern __shared__ float red[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nt = blockIdx.x, m0 = blockIdx.y * (8 * TM), WK = blockDim.x >> 5;
  u32 *xs = (u32 *)(red + WK * 32 * TM * 4);
  const int steps = a.G * a.SG;
  uint4 wb[PF][P];
  // per-channel: this warp's first weight batch goes out before the activation staging is waited on
  if (a.G == 1) load_batch(a, nt, warp, steps, WK, lane, wb);
  if (a.stage_stride > 0) {
    const int rows = min(8 * TM, a.M - m0), kw = a.G * a.gw;
    stage_rows(xs, a.act, Q * rows, kw, a.stage_stride,
               [&](int r) { return ((i64)(r / rows) * a.M + m0 + r % rows) * kw; });
    asm volatile("cp.async.wait_all;\n" ::);
    __syncthreads();
  }
  const int g = lane >> 2, t = lane & 3;
  float part[TM][4];
#pragma unroll
  for (int tm = 0; tm < TM; ++tm)
#pragma unroll
    for (int r = 0; r < 4; ++r) part[tm][r] = 0.f;

  int acc[TM][S_ACC][4];
  if (a.G == 1) {
    // per-channel: warps split the K steps; integer partials are reduced exactly across warps
    zero_acc(acc);
    run_steps(a, xs, nt, warp, steps, WK, m0, lane, wb, acc);
#pragma unroll
    for (int tm = 0; tm < TM; ++tm)
#pragma unroll
      for (int r = 0; r < 4; ++r) part[tm][r] = __int_as_float(combine(acc[tm], r));
  } else {
    // per-group: warps split whole groups; each group is corrected and scaled when it ends
    for (int grp = warp; grp < a.G; grp += WK) {
      zero_acc(acc);
      load_batch(a, nt, grp * a.SG, (grp + 1) * a.SG, 1, lane, wb);
      run_steps(a, xs, nt, grp * a.SG, (grp + 1) * a.SG, 1, m0, lane, wb, acc);
#pragma unroll
      for (int tm = 0; tm < TM; ++tm)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int n = nt * 16 + g + (r >> 1) * 8, m = m0 + tm * 8 + 2 * t + (r & 1);
          const int c = combine(acc[tm], r);
          if (n < a.N && m < a.M) {
            if (a.mode == 0) ((int *)a.out)[((i64)m * a.N + n) * a.G + grp] = c;
            else part[tm][r] += group_term(a, n, m, grp, c);
          }
        }
    }
    if (a.mode == 0) return;
  }

  // cross-warp reduction (ints stored bitwise in the float buffer for the per-channel case)
#pragma unroll
  for (int tm = 0; tm < TM; ++tm)
#pragma unroll
    for (int r = 0; r < 4; ++r) red[(warp * 32 + lane) * (TM * 4) + tm * 4 + r] = part[tm][r];
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int tm = 0; tm < TM; ++tm)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int n = nt * 16 + g + (r >> 1) * 8, m = m0 + tm * 8 + 2 * t + (r & 1);
      if (n >= a.N || m >= a.M) continue;
      if (a.G == 1) {
        int c = 0;
        for (int w = 0; w < WK; ++w) c += __float_as_int(red[(w * 32 + lane) * (TM * 4) + tm * 4 + r]);
        if (a.mode == 0) { ((int *)a.out)[(i64)m * a.N + n] = c; continue; }
        part[tm][r] = group_term(a, n, m, 0, c);
      } else {
        float y = 0.f;
        for (int w = 0; w < WK; ++w) y += red[(w * 32 + lane) * (TM * 4) + tm * 4 + r];
        part[tm][r] = y;
      }
      float y = part[tm][r] * a.a_scale[m];
      if (a.bias) y += a.bias[n];
      store_y(a.out, a.mode, (i64)m * a.N + n, y);
    }
}
