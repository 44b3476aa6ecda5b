// Shared by the abqc kernels: types, the binary MMA, asynchronous copies.
typedef unsigned int u32;
typedef long long i64;


__device__ __forceinline__ void bmma_and(int (&d)[4], const uint4 &a, u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}

// Asynchronous global -> shared copies (sm_80+): every copy of a staging loop is in flight at once.
__device__ __forceinline__ void cp_async16(void *dst, const void *src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"((u32)__cvta_generic_to_shared(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async4(void *dst, const void *src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"((u32)__cvta_generic_to_shared(dst)), "l"(src));
}
// The same copies writing zeros instead where !valid (src must still be a valid address; nothing is read).
__device__ __forceinline__ void cp_async16z(void *dst, const void *src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"((u32)__cvta_generic_to_shared(dst)),
               "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4z(void *dst, const void *src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"((u32)__cvta_generic_to_shared(dst)),
               "l"(src), "r"(valid ? 4 : 0));
}

// Programmatic dependent launch (sm_90): a kernel launched with the PDL attribute may start while the
// kernel before it still runs; pdl_wait() blocks until that kernel has finished and its writes are
// visible. Launched without the attribute (or below sm_90) both are no-ops.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
// Hopper (sm_90): mbarriers completed by bulk copies (the gemv bulk builds, wgmma8) and the warpgroup
// MMA's fences and descriptors (wgmma, wgmma8).
__device__ __forceinline__ u32 smem_u32(const void *p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(unsigned long long *bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
// the initialised barriers made visible to the async proxy (the bulk-copy engine) before any copy names them
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_expect_tx(unsigned long long *bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned long long *bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void bulk_load(void *dst, const void *src, u32 bytes, unsigned long long *bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
               ::"r"(smem_u32(dst)), "l"(src), "r"(bytes), "r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long *bar, u32 parity) {
  asm volatile("{\n.reg .pred done;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
               "@!done bra WAIT;\n}\n" ::"r"(smem_u32(bar)), "r"(parity) : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Descriptor of a K-major B tile of 32-byte rows, no swizzle: core matrices of 8 rows x 16 bytes; the
// second 16 bytes of every row LBO = 128 bytes on, the next 8 rows SBO = 256 bytes on. Row r, half h of
// a tile: r/8*256 + h*128 + r%8*16. (256 bits of b1, or 32 bytes of u8, per row: one k256 / k32 MMA.)
__device__ __forceinline__ unsigned long long wg_desc(const void *tile) {
  const u32 addr = smem_u32(tile);
  return (unsigned long long)((addr >> 4) & 0x3FFF) | ((unsigned long long)(128 >> 4) << 16) |
         ((unsigned long long)(256 >> 4) << 32);
}
#endif

struct Args {
  const uint4 *wt;      // tiled weight planes [NT][S][P][32] uint4
  const u32 *act;       // activation planes [Q][M][KW]
  int M, N, K, G, gw, SG;   // gw words per group, SG 256-bit steps per group
  const float *w_scale; const int *w_zero; const int *w_sum;      // [N][G]; w_zero in fixed point
  const float *a_scale; const int *a_zero; const int *a_sum;      // [M], [M], [M][G] or [M][parts] if G == 1
  const float *bias;    // [N] or null
  void *out;            // int32 [M][N][G] (mode 0) or y [M][N] (mode 1 f32, 2 f16, 3 bf16)
  int mode;
  int stage_stride;     // > 0: the block copies its activation rows to shared memory with this row stride
  int a_parts;          // per-channel (G == 1): a_sum holds this many partial sums per token
  const void *x;        // gemv only: non-null = quantize these activations [M][K] in the kernel (act unused)
  int x_dtype;          // 1 f32, 2 f16, 3 bf16
  int symmetric;        // activation grid of x: symmetric (zero 2^(Q-1)) or asymmetric
};

__device__ __forceinline__ void store_y(void *out, int mode, i64 idx, float v) {
  if (mode == 1) {
    ((float *)out)[idx] = v;
  } else if (mode == 2) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    ((unsigned short *)out)[idx] = h;
  } else {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    ((unsigned short *)out)[idx] = h;
  }
}

#ifdef P
__device__ __forceinline__ void load_w(const Args &a, int nt, int s, int lane, uint4 (&wf)[P]) {
  const uint4 *src = a.wt + ((i64)(nt * (a.G * a.SG) + s) * P) * 32 + lane;
#pragma unroll
  for (int i = 0; i < P; ++i) wf[i] = __ldg(src + i * 32);
}
#endif

// Weight zero points arrive in fixed point, zero * 2^W_ZERO_FRAC_BITS (abqc.quant.ZERO_FRAC_BITS).
#define W_ZERO_FRAC_BITS 8

// Exact zero-point correction of one group (activation zero za, activation code sum sa over the
// group), scaled by the weight scale: 2^F * sum (u_a - za)(u_w - zw) = (c - za*sw) 2^F - zw_F (sa - kg*za)
// in integers, then one float conversion and the exact 2^-F (an integer zero gives the same float bits
// as the plain integer formula).
// The same from the group's weight terms already in registers (ws scale, zw fixed-point zero, wsum code sum;
// kg: the group's K).
__device__ __forceinline__ float term_of(i64 kg, float ws, i64 zw, i64 wsum, int c, i64 za, i64 sa) {
  const i64 tv = ((i64)c - za * wsum) * (1 << W_ZERO_FRAC_BITS) - zw * (sa - kg * za);
  return ws * ((float)tv * (1.f / (1 << W_ZERO_FRAC_BITS)));
}

__device__ __forceinline__ float group_term_of(const Args &a, int n, int grp, int c, i64 za, i64 sa) {
  const int gs = a.gw * 32;
  const i64 kg = grp < a.G - 1 ? gs : a.K - (i64)gs * (a.G - 1), i = (i64)n * a.G + grp;
  return term_of(kg, a.w_scale[i], a.w_zero[i], a.w_sum[i], c, za, sa);
}

__device__ __forceinline__ float group_term(const Args &a, int n, int m, int grp, int c) {
  i64 sa = 0;
  if (a.G == 1) { for (int p = 0; p < a.a_parts; ++p) sa += a.a_sum[(i64)m * a.a_parts + p]; }
  else sa = a.a_sum[(i64)m * a.G + grp];
  return group_term_of(a, n, grp, c, a.a_zero[m], sa);
}

// Store a warpgroup MMA's m64nTN accumulator tile (wgmma, wgmma8; warp w of the warpgroup holds channels
// n0 .. n0+15): register 4*cc + 2*v1 + v0 is channel n0 + g + 8*v1, token m0 + 8*cc + 2*t + v0. mode 0:
// the integer; else the per-channel epilogue (one K group) in the output dtype.
template <int NA>
__device__ __forceinline__ void store_wg_tile(const Args &a, const int (&total)[NA], int n0, int m0, int lane) {
  const int g = lane >> 2, t = lane & 3;
  // a thread's 2 channels' weight terms and, per 8-token column group, its 2 tokens' activation terms are
  // loaded once (group_term's inputs, so the same float operations and result)
  float ws[2] = {0.f, 0.f}, bias[2] = {0.f, 0.f};
  i64 zw[2] = {0, 0}, wsum[2] = {0, 0};
  if (a.mode != 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = min(n0 + g + 8 * h, a.N - 1);
      ws[h] = a.w_scale[n]; zw[h] = a.w_zero[n]; wsum[h] = a.w_sum[n];
      if (a.bias) bias[h] = a.bias[n];
    }
  }
#pragma unroll
  for (int cc = 0; cc < NA / 4; ++cc) {
    float as[2] = {0.f, 0.f};
    i64 za[2] = {0, 0}, sa[2] = {0, 0};
    if (a.mode != 0) {
#pragma unroll
      for (int v0 = 0; v0 < 2; ++v0) {
        const int m = m0 + cc * 8 + 2 * t + v0;
        if (m >= a.M) continue;
        as[v0] = a.a_scale[m]; za[v0] = a.a_zero[m];
        for (int p = 0; p < a.a_parts; ++p) sa[v0] += a.a_sum[(i64)m * a.a_parts + p];
      }
    }
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int h = v >> 1, v0 = v & 1;
      const int n = n0 + g + 8 * h, m = m0 + cc * 8 + 2 * t + v0;
      if (n >= a.N || m >= a.M) continue;
      const int c = total[cc * 4 + v];
      if (a.mode == 0) { ((int *)a.out)[(i64)m * a.N + n] = c; continue; }
      float y = term_of(a.K, ws[h], zw[h], wsum[h], c, za[v0], sa[v0]) * as[v0];
      if (a.bias) y += bias[h];
      store_y(a.out, a.mode, (i64)m * a.N + n, y);
    }
  }
}

// Stage activation rows [rows][KW] (row r at act + row_offset(r)) into shared memory with stride `stride`.
template <typename RowFn>
__device__ __forceinline__ void stage_rows(u32 *xs, const u32 *act, int rows, int kw, int stride, RowFn row_offset) {
  if ((kw & 3) == 0) {   // 16-byte aligned rows in global and shared memory (stride = 4 mod 32)
    const int kv = kw >> 2;
    for (int idx = threadIdx.x; idx < rows * kv; idx += blockDim.x) {
      const int r = idx / kv, v = idx - r * kv;
      cp_async16(xs + r * stride + 4 * v, act + row_offset(r) + 4 * v);
    }
  } else {
    for (int idx = threadIdx.x; idx < rows * kw; idx += blockDim.x) {
      const int r = idx / kw, w = idx - r * kw;
      cp_async4(xs + r * stride + w, act + row_offset(r) + w);
    }
  }
}
