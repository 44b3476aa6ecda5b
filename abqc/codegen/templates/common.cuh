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
  for (int i = 0; i < P; ++i) {
#if defined(GEMV_NOALLOC)
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(wf[i].x), "=r"(wf[i].y),
                 "=r"(wf[i].z), "=r"(wf[i].w) : "l"(src + i * 32));
#else
    wf[i] = __ldg(src + i * 32);
#endif
  }
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
