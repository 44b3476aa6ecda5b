// abqc bit-plane GEMV (family "gemv", per-channel weights, up to MT tokens). The generator prepends
// the config (P weight planes, Q activation planes, MT tokens at most, NTW 16-channel tiles per
// warp) and common.cuh.
//
// The MMA's N dimension holds (token, activation plane) pairs instead of tokens: column c = m*Q + j.
// At batch 1 and 8-bit activations one m16n8k256 covers all 8 planes, so a K step costs P MMAs
// rather than P*Q, and no column is padding. Each activation fragment read from shared memory feeds
// NTW channel tiles, so the staged activations are amortised over NTW times more weight bytes.
// Weight planes accumulate separately (acc[u][i]); the shifts 2^i and 2^j, the K-split reduction
// and the epilogue run once, at the end, via shared memory.
#define NCOL (MT * Q)
#define TN ((NCOL + 7) / 8)
#define PF_RAW (P >= 7 ? 1 : (P >= 5 ? 2 : (P == 4 ? 3 : (P == 3 ? 4 : (P == 2 ? 6 : 8)))))
#define PF (PF_RAW * 2 / ((TN + 1) * NTW) > 0 ? PF_RAW * 2 / ((TN + 1) * NTW) : 1)

__device__ __forceinline__ void load_tiles(const Args &a, int nt0, int nts, int s, int lane, uint4 (&w)[NTW][P]) {
#pragma unroll
  for (int u = 0; u < NTW; ++u) {
    if (nt0 + u < nts) load_w(a, nt0 + u, s, lane, w[u]);
    else {
#pragma unroll
      for (int i = 0; i < P; ++i) w[u][i] = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

extern "C" __global__ void __launch_bounds__(256) KERNEL_NAME(const Args a) {
  // shared memory: staged activation rows [M*Q][stride], then int partials [WK][16*NTW][TN*8]
  extern __shared__ u32 sm[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, WK = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3, nt0 = blockIdx.x * NTW, nts = (a.N + 15) / 16;
  const int kw = a.gw, steps = a.SG, ncol = a.M * Q, stride = a.stage_stride;
  u32 *xs = sm;
  int *red = (int *)(sm + ncol * stride);

  uint4 wb[PF][NTW][P];
#pragma unroll
  for (int b = 0; b < PF; ++b)
    if (warp + b * WK < steps) load_tiles(a, nt0, nts, warp + b * WK, lane, wb[b]);
  // row c = m*Q + j holds plane j of token m
  stage_rows(xs, a.act, ncol, kw, stride, [&](int c) { return ((i64)(c % Q) * a.M + c / Q) * kw; });
  asm volatile("cp.async.wait_all;\n" ::);
  __syncthreads();

  int acc[NTW][P][TN][4];
#pragma unroll
  for (int u = 0; u < NTW; ++u)
#pragma unroll
    for (int i = 0; i < P; ++i)
#pragma unroll
      for (int tn = 0; tn < TN; ++tn)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[u][i][tn][r] = 0;

  for (int s = warp; s < steps; s += PF * WK) {
#pragma unroll
    for (int b = 0; b < PF; ++b) {
      const int sb = s + b * WK;
      if (sb >= steps) break;
      const int w0 = sb * 8 + t;
      const bool v0 = w0 < kw, v1 = w0 + 4 < kw;
#pragma unroll
      for (int tn = 0; tn < TN; ++tn) {
        const int c = tn * 8 + g;
        u32 b0 = 0u, b1 = 0u;
        if (c < ncol) {
          if (v0) b0 = xs[c * stride + w0];
          if (v1) b1 = xs[c * stride + w0 + 4];
        }
#pragma unroll
        for (int u = 0; u < NTW; ++u)
#pragma unroll
          for (int i = 0; i < P; ++i) bmma_and(acc[u][i][tn], wb[b][u][i], b0, b1);
      }
    }
#pragma unroll
    for (int b = 0; b < PF; ++b)
      if (s + (PF + b) * WK < steps) load_tiles(a, nt0, nts, s + (PF + b) * WK, lane, wb[b]);
  }

  // weight planes combined in registers; columns (planes j, tokens) and warps through shared memory
#pragma unroll
  for (int u = 0; u < NTW; ++u)
#pragma unroll
    for (int tn = 0; tn < TN; ++tn)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        int v = 0;
#pragma unroll
        for (int i = 0; i < P; ++i) v += acc[u][i][tn][r] << i;
        red[(warp * 16 * NTW + u * 16 + g + (r >> 1) * 8) * (TN * 8) + tn * 8 + 2 * t + (r & 1)] = v;
      }
  __syncthreads();
  for (int o = threadIdx.x; o < 16 * NTW * a.M; o += blockDim.x) {
    const int nl = o / a.M, m = o - nl * a.M, n = nt0 * 16 + nl;
    if (n >= a.N) continue;
    int c = 0;
    for (int w = 0; w < WK; ++w)
#pragma unroll
      for (int j = 0; j < Q; ++j) c += red[(w * 16 * NTW + nl) * (TN * 8) + m * Q + j] << j;
    if (a.mode == 0) { ((int *)a.out)[(i64)m * a.N + n] = c; continue; }
    float y = group_term(a, n, m, 0, c) * a.a_scale[m];
    if (a.bias) y += a.bias[n];
    store_y(a.out, a.mode, (i64)m * a.N + n, y);
  }
}
