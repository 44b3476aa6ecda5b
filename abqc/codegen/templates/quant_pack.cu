// abqc activation path: per-token dynamic quantization and bit-plane packing (or, built with
// INT8_CODES, centred int8 codes for the INT8 family). The generator prepends Q (activation bits). Grid (tokens, K chunks): every block reads its whole
// row for the range (16-byte loads where the row allows), then quantizes and packs only its chunk of
// words: a token's packing is spread over many SMs. Codes never touch memory: each warp turns 32
// codes into Q words with __ballot_sync (lane l -> bit l, the canonical LSB-first layout). Same
// float32 arithmetic as abqc.quant (act_grid.cuh), so the codes equal the CPU reference's.
// Code sums: per group when groups are split across chunks never happens (G > 1: chunks hold whole
// groups) -> sums[m][g]; per-channel (G == 1) -> one partial per chunk, sums[m][chunk].
// Built with U8_TILED: uncentred codes as bytes for the wgmma8 GEMM, in its K order (wgmma8.cu): the code
// of k = 256s + 128h + 32t + 8e + c at chunk 8s + c, token row m, byte 16h + 4t + e, each chunk's rows in
// the MMA's core-matrix order (8-row groups of [half][row][16 bytes]); sums as for the planes.
typedef unsigned int u32;
typedef long long i64;

#define XS_BYTES (32 * 1024)   // U8_TILED: rows up to this size are staged in shared memory (stage)

struct QArgs {
  const void *x; int in_dtype;        // 1 f32, 2 f16, 3 bf16; x is [M][K] contiguous
  int M, K, KW, gw, G, symmetric;
  u32 *planes;                        // [Q][M][KW]
  int *sums;                          // [M][G] or [M][nchunks] when G == 1
  float *scale; int *zero;            // [M]
  int chunk_words, nchunks;
  signed char *codes;                 // INT8_CODES builds: [M][KW * 32] instead of planes; U8_TILED builds:
                                      // [8 * steps][mpad][32] byte codes in wgmma8.cu's K order
  int mpad;                           // U8_TILED: token rows of codes (M rounded up to 8)
  int SGW;                            // U8_TILED: 256-wide K steps of the codes (ceil(KW / 8))
};

__device__ __forceinline__ float h2f(unsigned short h, int bf) {
  if (bf) return __uint_as_float(((u32)h) << 16);
  float v;
  asm("cvt.f32.f16 %0, %1;" : "=f"(v) : "h"(h));
  return v;
}

__device__ __forceinline__ float load_x(const QArgs &a, i64 i) {
  if (a.in_dtype == 1) return ((const float *)a.x)[i];
  return h2f(((const unsigned short *)a.x)[i], a.in_dtype == 3);
}

extern "C" __global__ void __launch_bounds__(256) KERNEL_NAME(const QArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // the GEMV after this packer may launch now (programmatic dependent launch): it streams its weights
  // while this kernel runs and waits (griddepcontrol.wait) before it reads what this kernel writes
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  __shared__ float smin[8], smax[8];
  __shared__ int gsum[64];
  const int m = blockIdx.x, chunk = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const i64 base = (i64)m * a.K;
  const int w_begin = chunk * a.chunk_words, w_end = min(a.KW, w_begin + a.chunk_words);
  float lo = __int_as_float(0x7f800000), hi = __int_as_float(0xff800000);
  const int per_vec = a.in_dtype == 1 ? 4 : 8;
#ifdef U8_TILED
  // A block coding a whole row (prefill: one row a block) keeps the row it reads for the min/max in shared
  // memory and codes it from there: each row leaves HBM once, not twice.
  __shared__ uint4 xsm[XS_BYTES / 16];
  const bool stage = a.K % per_vec == 0 && w_begin == 0 && w_end == a.KW &&
                     (i64)a.K * (a.in_dtype == 1 ? 4 : 2) <= XS_BYTES;
#else
  uint4 *xsm = nullptr;   // the planes and INT8 builds read rows from global memory twice (no staging)
  const bool stage = false;
#endif
  if (a.K % per_vec == 0) {
    const uint4 *row = (const uint4 *)((const char *)a.x + base * (a.in_dtype == 1 ? 4 : 2));
    const int nv = a.K / per_vec;
    for (int v0 = threadIdx.x; v0 < nv; v0 += 4 * blockDim.x) {
      uint4 r[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) if (v0 + u * blockDim.x < nv) r[u] = __ldg(row + v0 + u * blockDim.x);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (v0 + u * blockDim.x >= nv) break;
        if (stage) xsm[v0 + u * blockDim.x] = r[u];
        const u32 w[4] = {r[u].x, r[u].y, r[u].z, r[u].w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (a.in_dtype == 1) {
            const float f = __uint_as_float(w[e]);
            lo = fminf(lo, f); hi = fmaxf(hi, f);
          } else {
            const float f0 = h2f((unsigned short)(w[e] & 0xffff), a.in_dtype == 3);
            const float f1 = h2f((unsigned short)(w[e] >> 16), a.in_dtype == 3);
            lo = fminf(lo, fminf(f0, f1)); hi = fmaxf(hi, fmaxf(f0, f1));
          }
        }
      }
    }
  } else {
    for (int k0 = threadIdx.x; k0 < a.K; k0 += 8 * blockDim.x) {
      float v[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int k = k0 + u * blockDim.x;
        v[u] = k < a.K ? load_x(a, base + k) : 0.f;
      }
#pragma unroll
      for (int u = 0; u < 8; ++u)
        if (k0 + u * blockDim.x < a.K) { lo = fminf(lo, v[u]); hi = fmaxf(hi, v[u]); }
    }
  }
  for (int o = 16; o; o >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
  if (lane == 0) { smin[warp] = lo; smax[warp] = hi; }
  for (int i = threadIdx.x; i < 64; i += blockDim.x) gsum[i] = 0;
  __syncthreads();
  lo = smin[0]; hi = smax[0];
  for (int w = 1; w < nwarps; ++w) { lo = fminf(lo, smin[w]); hi = fmaxf(hi, smax[w]); }
  float scale, zero;
  act_grid(lo, hi, a.symmetric, scale, zero);
  if (chunk == 0 && threadIdx.x == 0) { a.scale[m] = scale; a.zero[m] = (int)zero; }
  const int g0 = a.G == 1 ? 0 : w_begin / a.gw;
#ifdef U8_TILED
  if (stage) {   // per-channel: one 4-byte granule of wgmma8's K order a thread, read back from the staged row
    // lane (c, t) = (l & 7, l >> 3) of granule group (s, h): codes of k = 256s + 128h + 32t + 8e + c, e = 0..3
    // (the 2-byte reads of a warp fall in distinct 4-byte banks or share one)
    int sum = 0;
    for (int gi = threadIdx.x; gi < a.SGW * 64; gi += blockDim.x) {
      const int c = gi & 7, t = (gi >> 3) & 3, h = (gi >> 5) & 1, s = gi >> 6;
      u32 four = 0u;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int k = 256 * s + 128 * h + 32 * t + 8 * e + c;
        if (k < a.K) {
          const float v = a.in_dtype == 1 ? ((const float *)xsm)[k]
                                          : h2f(((const unsigned short *)xsm)[k], a.in_dtype == 3);
          const int u = act_code(v, scale, zero);
          sum += u;
          four |= (u32)u << (8 * e);
        }
      }
      *(u32 *)(a.codes + ((i64)(8 * s + c) * a.mpad + (m & ~7)) * 32 + h * 128 + (m & 7) * 16 + t * 4) = four;
    }
    for (int o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) atomicAdd(&gsum[0], sum);
  } else
#endif
  for (int w = w_begin + warp; w < w_end; w += nwarps) {
    const int k = w * 32 + lane;
    int u = 0;
    if (k < a.K) u = act_code(load_x(a, base + k), scale, zero);
#ifdef INT8_CODES
    // the INT8 family (int8.cu): centred codes a8 = u - 2^(Q-1), zero past K; sums are of a8
    const int code = k < a.K ? u - (1 << (Q - 1)) : 0;
    a.codes[(i64)m * a.KW * 32 + k] = (signed char)code;
    int sum = code;
#elif defined(U8_TILED)
    // lane b holds the code of bit b = 8e + c of word w: lanes c, c+8, c+16, c+24 make chunk c's 4 bytes
    u32 four = 0u;
#pragma unroll
    for (int e = 0; e < 4; ++e) four |= (u32)__shfl_sync(0xffffffffu, u, (lane & 7) + 8 * e) << (8 * e);
    if (lane < 8) {
      const int s = w >> 3, t = w & 3, h = (w >> 2) & 1;
      *(u32 *)(a.codes + ((i64)(8 * s + lane) * a.mpad + (m & ~7)) * 32 + h * 128 + (m & 7) * 16 + t * 4) = four;
    }
    int sum = u;
#else
    u32 mine = 0;   // lane j keeps plane j's word and stores it: Q stores in parallel
#pragma unroll
    for (int j = 0; j < Q; ++j) {
      const u32 bits = __ballot_sync(0xffffffffu, (u >> j) & 1);
      if (lane == j) mine = bits;
    }
    if (lane < Q) a.planes[((i64)lane * a.M + m) * a.KW + w] = mine;
    int sum = u;
#endif
    for (int o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) atomicAdd(&gsum[a.G == 1 ? 0 : w / a.gw - g0], sum);
  }
  __syncthreads();
  if (a.G == 1) {
    if (threadIdx.x == 0) a.sums[(i64)m * a.nchunks + chunk] = gsum[0];
  } else {
    const int g1 = (w_end + a.gw - 1) / a.gw;
    for (int gi = g0 + threadIdx.x; gi < g1; gi += blockDim.x) a.sums[(i64)m * a.G + gi] = gsum[gi - g0];
  }
}
