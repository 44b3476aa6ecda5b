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
// Launched with Args.x set ("gemvq"), the kernel quantizes and packs the activations itself (quant_rows):
// every block re-derives the few token rows' codes (from a shared-memory copy of the rows where they fit),
// instead of a separate packing launch and its round trip through memory.
// Built with WBULK (sm_90 only; families "gemvt" / "gemvqt"), the block's weights do not pass through
// registers: at entry one lane per chunk of K steps hands the Hopper bulk-copy (TMA) engine one contiguous
// copy per channel tile into shared memory, each chunk completing an mbarrier, and the warps read their
// steps from there as the chunks land. The whole block's weights are in flight before the kernel waits
// for its predecessor (PDL) or quantizes, with no register or L1 budget capping the bytes in flight.
#ifndef WBULK
#define WBULK 0
#endif
#define NBAR 32   // WBULK: at most this many chunks (mbarriers) per block
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

// One K step of the block's MMAs for one warp: its activation fragments (columns (token, plane) of step sb)
// from the staged rows times NTW x P weight fragments.
__device__ __forceinline__ void mma_step(int (&acc)[NTW][P][TN][4], const uint4 (&wf)[NTW][P], const u32 *xs,
                                         int stride, int ncol, int kw, int sb, int g, int t) {
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
      for (int i = 0; i < P; ++i) bmma_and(acc[u][i][tn], wf[u][i], b0, b1);
  }
}

__device__ __forceinline__ float x_at(const Args &a, i64 i) {
  if (a.x_dtype == 1) return __ldg((const float *)a.x + i);
  const unsigned short h = __ldg((const unsigned short *)a.x + i);
  if (a.x_dtype == 3) return __uint_as_float(((u32)h) << 16);
  float v;
  asm("cvt.f32.f16 %0, %1;" : "=f"(v) : "h"(h));
  return v;
}

// x / y rounded to nearest, as IEEE division gives it, without the division's out-of-line slow path:
// the compiler's own fast path (reciprocal, one Newton step, one residual correction), which is exact
// wherever its range check passes. Here y is a scale >= 1e-8 or qmax and |x / y| <= 2^Q, so the check
// fails only for a denormal x, whose quotient (< 1e-30) rounds to the same integer code, 0. The slow
// path's call would make every live register of this kernel obey the call ABI (spills in the MMA loop).
__device__ __forceinline__ float div_rn(float x, float y) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y));
  const float r1 = __fmaf_rn(r, __fmaf_rn(-y, r, 1.f), r), q = __fmaf_rn(x, r1, 0.f);
  return __fmaf_rn(r1, __fmaf_rn(-y, q, x), q);
}

__device__ __forceinline__ void minmax2(u32 w, int bf, float &lo, float &hi) {
  const unsigned short h0 = (unsigned short)(w & 0xffff), h1 = (unsigned short)(w >> 16);
  float f0, f1;
  if (bf) { f0 = __uint_as_float(((u32)h0) << 16); f1 = __uint_as_float(((u32)h1) << 16); }
  else {
    asm("cvt.f32.f16 %0, %1;" : "=f"(f0) : "h"(h0));
    asm("cvt.f32.f16 %0, %1;" : "=f"(f1) : "h"(h1));
  }
  lo = fminf(lo, fminf(f0, f1)); hi = fmaxf(hi, fmaxf(f0, f1));
}

// Rows of x up to this many bytes in all are copied to shared memory first (cp.async, every copy in
// flight at once) and quantized from there; runtime.cuda.GEMVQ_XSTAGE_BYTES mirrors it to size the launch.
// Larger or unaligned inputs are read from L2 element by element (a chain of dependent L2 round trips).
#define XSTAGE_BYTES (64 * 1024)

__device__ __forceinline__ bool x_staged(const Args &a) {
  const int esz = a.x_dtype == 1 ? 4 : 2;
  return (i64)a.M * a.K * esz <= XSTAGE_BYTES && (a.K * esz) % 16 == 0 && (((unsigned long long)a.x) & 15) == 0;
}

__device__ __forceinline__ float smem_x(const void *xsm, int dt, int i) {
  if (dt == 1) return ((const float *)xsm)[i];
  const unsigned short h = ((const unsigned short *)xsm)[i];
  if (dt == 3) return __uint_as_float(((u32)h) << 16);
  float v;
  asm("cvt.f32.f16 %0, %1;" : "=f"(v) : "h"(h));
  return v;
}

// One word of a token's codes: lane l's value -> its code (0 where !valid, past K), and plane j's 32 bits
// (lane l -> bit l) stored by lane j at dst[j * plane_stride]. Returns the lane's code.
__device__ __forceinline__ int code_word(float v, bool valid, float sc, float zf, int lane, u32 *dst, int plane_stride) {
  const int u = valid ? (int)fminf(fmaxf(rintf(div_rn(v, sc)) + zf, 0.f), (float)((1 << Q) - 1)) : 0;
  u32 mine = 0;
#pragma unroll
  for (int j = 0; j < Q; ++j) {
    const u32 bits = __ballot_sync(0xffffffffu, (u >> j) & 1);
    if (lane == j) mine = bits;
  }
  if (lane < Q) dst[lane * plane_stride] = mine;
  return u;
}

// Per-token dynamic quantization of x [M][K] into the staged rows (row m*Q + j = plane j of token m),
// with quant_pack.cu's float32 arithmetic, so the codes, scale, zero and code sum equal the packer's.
// xsm: shared memory for the staged rows (x_staged), or null to read x from global memory.
__device__ __forceinline__ void quant_rows(const Args &a, u32 *xs, int stride, float *qs, int *qz, int *qsum,
                                           float *rlo, float *rhi, void *xsm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5, kw = a.gw;
  const int esz = a.x_dtype == 1 ? 4 : 2, per_vec = 16 / esz;
  const bool vec = a.K % per_vec == 0 && (((unsigned long long)a.x) & 15) == 0;
  if (xsm) {
    const uint4 *src = (const uint4 *)a.x;
    uint4 *dst = (uint4 *)xsm;
    const int nv = a.M * a.K / per_vec;
    for (int v = threadIdx.x; v < nv; v += blockDim.x) cp_async16(dst + v, src + v);
    asm volatile("cp.async.wait_all;\n" ::);
    __syncthreads();
  }
  for (int m = 0; m < a.M; ++m) {   // a runtime loop of scalars: nothing held across tokens
    float lo = __int_as_float(0x7f800000), hi = __int_as_float(0xff800000);
    if (vec) {
      const uint4 *row = (const uint4 *)((const char *)(xsm ? xsm : a.x) + (i64)m * a.K * esz);
      for (int v = threadIdx.x; v < a.K / per_vec; v += blockDim.x) {
        const uint4 r = xsm ? row[v] : __ldg(row + v);
        if (a.x_dtype == 1) {
          lo = fminf(lo, fminf(fminf(__uint_as_float(r.x), __uint_as_float(r.y)),
                               fminf(__uint_as_float(r.z), __uint_as_float(r.w))));
          hi = fmaxf(hi, fmaxf(fmaxf(__uint_as_float(r.x), __uint_as_float(r.y)),
                               fmaxf(__uint_as_float(r.z), __uint_as_float(r.w))));
        } else {
          minmax2(r.x, a.x_dtype == 3, lo, hi); minmax2(r.y, a.x_dtype == 3, lo, hi);
          minmax2(r.z, a.x_dtype == 3, lo, hi); minmax2(r.w, a.x_dtype == 3, lo, hi);
        }
      }
    } else {
      for (int k = threadIdx.x; k < a.K; k += blockDim.x) {
        const float f = x_at(a, (i64)m * a.K + k);
        lo = fminf(lo, f); hi = fmaxf(hi, f);
      }
    }
#pragma unroll
    for (int o = 16; o; o >>= 1) {
      lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
      hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    }
    if (lane == 0) { rlo[warp * MT + m] = lo; rhi[warp * MT + m] = hi; }
  }
  __syncthreads();
  const int qmax = (1 << Q) - 1;
  if (threadIdx.x < a.M) {
    const int m = threadIdx.x;
    float l = rlo[m], h = rhi[m];
    for (int w = 1; w < nw; ++w) { l = fminf(l, rlo[w * MT + m]); h = fmaxf(h, rhi[w * MT + m]); }
    float scale, zero;
    if (a.symmetric) {
      const float absmax = fmaxf(fabsf(h), fabsf(l));
      scale = fmaxf(div_rn(absmax, (float)((1 << (Q - 1)) - 1)), 1e-8f);
      zero = (float)(1 << (Q - 1));
    } else {
      const float mn = fminf(l, 0.f), mx = fmaxf(h, 0.f);
      scale = fmaxf(div_rn(mx - mn, (float)qmax), 1e-8f);
      zero = fminf(fmaxf(rintf(div_rn(-mn, scale)), 0.f), (float)qmax);
    }
    qs[m] = scale; qz[m] = (int)zero; qsum[m] = 0;
  }
  __syncthreads();
  for (int m = 0; m < a.M; ++m) {
    const float sc = qs[m], zf = (float)qz[m];
    int sum = 0;                 // this lane's codes of token m, reduced once per warp below
    if (xsm) {
#pragma unroll 4
      for (int w = warp; w < kw; w += nw) {
        const int k = w * 32 + lane;
        const float v = k < a.K ? smem_x(xsm, a.x_dtype, m * a.K + k) : 0.f;
        sum += code_word(v, k < a.K, sc, zf, lane, xs + m * Q * stride + w, stride);
      }
    } else {
      // 4 words per warp in flight: their loads are issued together
      for (int w0 = warp; w0 < kw; w0 += 4 * nw) {
        float v[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int k = (w0 + r * nw) * 32 + lane;
          v[r] = w0 + r * nw < kw && k < a.K ? x_at(a, (i64)m * a.K + k) : 0.f;
        }
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int w = w0 + r * nw, k = w * 32 + lane;
          if (w >= kw) break;
          sum += code_word(v[r], k < a.K, sc, zf, lane, xs + m * Q * stride + w, stride);
        }
      }
    }
#pragma unroll
    for (int o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) atomicAdd(&qsum[m], sum);
  }
}

extern "C" __global__ void __launch_bounds__(256, 1) KERNEL_NAME(const Args a) {
  // shared memory: (WBULK: the block's weights [NTW][steps][P][32] uint4), staged activation rows
  // [M*Q][stride], then int partials [WK][16*NTW][TN*8]
  extern __shared__ __align__(16) u32 sm[];
  __shared__ float qs[MT], rlo[8 * MT], rhi[8 * MT];   // in-kernel quantization: scale, min/max partials
  __shared__ int qz[MT], qsum[MT];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, WK = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3, nt0 = blockIdx.x * NTW, nts = (a.N + 15) / 16;
  const int kw = a.gw, steps = a.SG, ncol = a.M * Q, stride = a.stage_stride;
#if WBULK
  const int tiles = min(NTW, nts - nt0), rounds = (steps + WK - 1) / WK, rc = (rounds + NBAR - 1) / NBAR;
  const int nchunks = (rounds + rc - 1) / rc;    // chunk c: rounds [c*rc, (c+1)*rc) of WK steps each
  const uint4 *wsm = (const uint4 *)sm;
  u32 *xs = sm + NTW * steps * P * 128;
  __shared__ __align__(8) unsigned long long bars[NBAR];
  if (threadIdx.x == 0) {
    for (int c = 0; c < nchunks; ++c) mbar_init(&bars[c], 1);
    mbar_init_fence();
  }
  __syncthreads();
  if (warp == 0 && lane < nchunks) {   // weights are never written by the kernel before: no PDL wait
    const int s0 = lane * rc * WK, s1 = min(steps, (lane + 1) * rc * WK);
    const u32 bytes = (u32)(s1 - s0) * P * 512;
    mbar_expect_tx(&bars[lane], bytes * tiles);
    for (int u = 0; u < tiles; ++u)
      bulk_load((void *)(wsm + ((i64)u * steps + s0) * P * 32), a.wt + ((i64)(nt0 + u) * steps + s0) * P * 32,
                bytes, &bars[lane]);
  }
  if (a.mode != 0 && threadIdx.x < 16 * tiles && nt0 * 16 + (int)threadIdx.x < a.N) {   // the epilogue's weight terms
    const int n = nt0 * 16 + threadIdx.x;
    asm volatile("prefetch.global.L2 [%0];" ::"l"(a.w_scale + n));
    asm volatile("prefetch.global.L2 [%0];" ::"l"(a.w_zero + n));
    asm volatile("prefetch.global.L2 [%0];" ::"l"(a.w_sum + n));
  }
#else
  u32 *xs = sm;
#endif
  int *red = (int *)(xs + ncol * stride);

  if (a.x && !WBULK) {
    // gemvq: the block's weights head for L2 while it quantizes (prefetches hold no registers, so nothing
    // is live across quant_rows' division); the loads below then hit L2. (For the packer-fed build the
    // same prefetch measured 0-12% slower on the H200: its PF-deep register loads already cover the latency.)
    const int tiles = min(NTW, nts - nt0);
    const uint4 *pw = a.wt + (i64)nt0 * steps * P * 32 + lane;
    for (int idx = warp; idx < tiles * steps; idx += WK) {   // (tile, step) pairs, P planes each
      const uint4 *src = pw + (i64)idx * P * 32;
      for (int i = 0; i < P; ++i) asm volatile("prefetch.global.L2 [%0];" ::"l"(src + i * 32));
    }
  }
  // gemvq: the x rows are staged where the K-split partials go later (both never live at once)
  if (a.x) {
    pdl_wait();
    quant_rows(a, xs, stride, qs, qz, qsum, rlo, rhi, x_staged(a) ? (void *)red : nullptr);
  }
#if !WBULK
  uint4 wb[PF][NTW][P];
#pragma unroll
  for (int b = 0; b < PF; ++b)
    if (warp + b * WK < steps) load_tiles(a, nt0, nts, warp + b * WK, lane, wb[b]);
#endif
  // Launched as the packer's dependent (PDL), everything above ran while the packer did: the first PF
  // steps of weights are in flight. Only what the packer writes (planes, scales, sums) waits for it.
  if (!a.x) pdl_wait();
  // row c = m*Q + j holds plane j of token m
  if (!a.x) {
    stage_rows(xs, a.act, ncol, kw, stride, [&](int c) { return ((i64)(c % Q) * a.M + c / Q) * kw; });
    asm volatile("cp.async.wait_all;\n" ::);
  }
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

#if WBULK
  for (int s = warp; s < steps; s += WK) {
    mbar_wait(&bars[(s / WK) / rc], 0);
    uint4 wf[NTW][P];
#pragma unroll
    for (int u = 0; u < NTW; ++u)
#pragma unroll
      for (int i = 0; i < P; ++i)
        wf[u][i] = u < tiles ? wsm[(((i64)u * steps + s) * P + i) * 32 + lane] : make_uint4(0u, 0u, 0u, 0u);
    mma_step(acc, wf, xs, stride, ncol, kw, s, g, t);
  }
#else
  for (int s = warp; s < steps; s += PF * WK) {
#pragma unroll
    for (int b = 0; b < PF; ++b) {
      const int sb = s + b * WK;
      if (sb >= steps) break;
      mma_step(acc, wb[b], xs, stride, ncol, kw, sb, g, t);
    }
#pragma unroll
    for (int b = 0; b < PF; ++b)
      if (s + (PF + b) * WK < steps) load_tiles(a, nt0, nts, s + (PF + b) * WK, lane, wb[b]);
  }
#endif

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
    float y = a.x ? group_term_of(a, n, 0, c, qz[m], qsum[m]) * qs[m] : group_term(a, n, m, 0, c) * a.a_scale[m];
    if (a.bias) y += a.bias[n];
    store_y(a.out, a.mode, (i64)m * a.N + n, y);
  }
}
