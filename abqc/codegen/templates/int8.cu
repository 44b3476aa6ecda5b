// abqc INT8 family: W(P)A(Q) as one INT8 tensor-core GEMM (torch._int_mm, cuBLASLt IMMA) between the
// two kernels here. Codes are centred so they fit int8: w8 = u_w - 2^(P-1), a8 = u_a - 2^(Q-1) (the
// activation side comes from quant_pack.cu built with INT8_CODES). Columns k >= K are zero on both sides,
// so acc = sum_k a8 * w8 over the real K, and the epilogue undoes the centring exactly:
//   sum_k (u_a - z_a)(u_w - z_w) = acc + rw * A8 + ra * W8 + K * ra * rw,  ra = ca - z_a, rw = cw - z_w,
// with A8 = sum_k a8 (per token), W8 = sum_k w8 = w_sum - K * cw (per channel). Per-channel weights only.
// The generator prepends KERNEL_NAME and one of INT8_UNPACK / INT8_EPILOGUE.

#ifdef INT8_UNPACK
struct UnpackArgs {
  const u32 *wt;        // tiled weight planes [NT][S][P][32 lanes][4 words] (abqc.codegen.layout)
  signed char *w8;      // [N][KP] centred codes, KP = 32 * words per row (zero past K)
  int N, K, KP, P, S, SG, gw;
};

// One thread per tiled word slot (nt, s, lane, j): reads its P plane words (coalesced across the warp),
// writes the 32 codes of that (channel, word) as two 16-byte stores. Bits become bytes four at a time:
// nibble * 0x00204081 puts its bit b at bit 8b + b, the mask keeps bit 0 of each byte (about 6 integer
// operations per plane per 4 codes; bit by bit, the unpack was compute-bound at 3-4x the time of its stores).
extern "C" __global__ void __launch_bounds__(256) KERNEL_NAME(const UnpackArgs a) {
  const i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  const int nt_count = (a.N + 15) / 16;
  if (e >= (i64)nt_count * a.S * 128) return;
  const int j = (int)(e & 3), lane = (int)((e >> 2) & 31);
  const i64 ts = e >> 7;                      // nt * S + s
  const int s = (int)(ts % a.S), nt = (int)(ts / a.S);
  const int n = nt * 16 + (lane >> 2) + ((j & 1) ? 8 : 0);
  const int within = (s % a.SG) * 8 + (lane & 3) + ((j & 2) ? 4 : 0);
  if (n >= a.N || within >= a.gw) return;    // padding slots of the tiled layout
  const int w = (s / a.SG) * a.gw + within;
  u32 out[8] = {0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u};
  for (int i = 0; i < a.P; ++i) {
    const u32 x = a.wt[(ts * a.P + i) * 128 + lane * 4 + j];
#pragma unroll
    for (int q = 0; q < 8; ++q) out[q] |= ((((x >> (4 * q)) & 0xfu) * 0x00204081u) & 0x01010101u) << i;
  }
  const u32 centre = (1u << (a.P - 1)) * 0x01010101u;
  const int valid = a.K - w * 32;             // codes of this word inside K; the rest are zero
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    u32 v = __vsub4(out[q], centre);          // per byte: u - 2^(P-1), two's complement
    if (valid < 32) {
      const int keep = min(max(valid - 4 * q, 0), 4);
      v = keep == 4 ? v : (v & ((1u << (8 * keep)) - 1u));
    }
    out[q] = v;
  }
  uint4 *dst = (uint4 *)(a.w8 + (i64)n * a.KP + (i64)w * 32);
  dst[0] = make_uint4(out[0], out[1], out[2], out[3]);
  dst[1] = make_uint4(out[4], out[5], out[6], out[7]);
}
#endif

#ifdef INT8_EPILOGUE
struct EpiArgs {
  const int *acc;       // [M][ldacc] int32: sum_k a8 * w8 (columns >= N: padding)
  int M, N, ldacc, K, ca, cw;  // centres ca = 2^(Q-1), cw = 2^(P-1)
  const float *w_scale; const int *w_zero; const int *w_sum;     // [N] (w_sum: sum of the codes u_w)
  const float *a_scale; const int *a_zero; const int *a8_sum;    // [M], [M], [M][a_parts] partial sums of a8
  int a_parts;
  const float *bias;    // [N] or null
  void *out;            // mode 0: int32 [M][N] = sum_k u_a * u_w (the bit-plane kernels' accumulator);
  int mode;             // 1 f32, 2 f16, 3 bf16: y [M][N]
};

extern "C" __global__ void __launch_bounds__(256) KERNEL_NAME(const EpiArgs a) {
  const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (i64)a.M * a.N) return;
  const int m = (int)(idx / a.N), n = (int)(idx - (i64)m * a.N);
  i64 a8 = 0;
  for (int p = 0; p < a.a_parts; ++p) a8 += a.a8_sum[(i64)m * a.a_parts + p];
  const i64 w8 = (i64)a.w_sum[n] - (i64)a.K * a.cw;
  const i64 acc = a.acc[(i64)m * a.ldacc + n];
  if (a.mode == 0) {
    ((int *)a.out)[idx] = (int)(acc + (i64)a.cw * a8 + (i64)a.ca * w8 + (i64)a.K * a.ca * a.cw);
    return;
  }
  // w_zero in fixed point (common.cuh): t = 2^F * sum_k (u_a - z_a)(u_w - z_w), exact
  const i64 ra = a.ca - a.a_zero[m], rw = ((i64)a.cw << W_ZERO_FRAC_BITS) - a.w_zero[n];
  const i64 t = (acc << W_ZERO_FRAC_BITS) + rw * a8 + ra * (w8 << W_ZERO_FRAC_BITS) + (i64)a.K * ra * rw;
  float y = a.w_scale[n] * ((float)t * (1.f / (1 << W_ZERO_FRAC_BITS))) * a.a_scale[m];
  if (a.bias) y += a.bias[n];
  store_y(a.out, a.mode, idx, y);
}
#endif

#ifdef INT8_GEMM
// acc [M][ldacc] int32 = sum_k a8[m][k] * w8[n][k] on the INT8 tensor cores (mma.sync m16n8k32 s8), with
// w8 = u_w - 2^(P-1) unpacked from the tiled bit-planes into shared memory one 256-wide K step at a time:
// what int8_unpack + torch._int_mm compute, without the int8 weights' round trip through memory.
// A warp owns one 16-channel tile and TMI tiles of 8 tokens; it unpacks its tile's step (each lane the
// four words of the b1 fragment layout, multiply-spread as in int8_unpack) into a warp-private [16][WROW]
// byte tile (rows padded by 16 bytes: the fragment loads hit 32 distinct banks), then runs the step's
// eight k32 chunks. a8 is zero past K, so the codes of padding columns (any value) add nothing.
struct GemmArgs {
  const u32 *wt;              // tiled weight planes [NT][S][P][32 lanes][4 words]
  const signed char *a8;      // [M][KP] centred activation codes (quant_int8), zero past K
  int *acc;                   // [M][ldacc]
  int M, N, KP, P, S, ldacc;
};
#define GEMM_WARPS 4
#define TMI 4
#define WROW (256 + 16)

__device__ __forceinline__ void mma_s8(int (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

extern "C" __global__ void __launch_bounds__(GEMM_WARPS * 32) KERNEL_NAME(const GemmArgs a) {
  __shared__ __align__(16) unsigned char tile[GEMM_WARPS][16 * WROW];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
  const int nt = blockIdx.x * GEMM_WARPS + warp, m0 = blockIdx.y * (8 * TMI);
  if (nt * 16 >= a.N) return;               // only warp-level synchronisation below
  unsigned char *s = tile[warp];
  const u32 centre = (1u << (a.P - 1)) * 0x01010101u;
  int acc[TMI][4];
#pragma unroll
  for (int t = 0; t < TMI; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0;
  for (int st = 0; st < a.S; ++st) {
    u32 out[4][8];
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int q = 0; q < 8; ++q) out[j][q] = 0u;
    const uint4 *src = (const uint4 *)a.wt + ((i64)nt * a.S + st) * a.P * 32 + lane;
    for (int i = 0; i < a.P; ++i) {
      const uint4 x = __ldg(src + i * 32);
      const u32 xs[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int q = 0; q < 8; ++q) out[j][q] |= ((((xs[j] >> (4 * q)) & 0xfu) * 0x00204081u) & 0x01010101u) << i;
    }
    __syncwarp();                           // the previous step's fragment loads are done
#pragma unroll
    for (int j = 0; j < 4; ++j) {           // word j: row g (+8 for odd j), words tig (+4 for j >= 2) of the step
      uint4 *dst = (uint4 *)(s + (g + ((j & 1) ? 8 : 0)) * WROW + 32 * (tig + ((j & 2) ? 4 : 0)));
      dst[0] = make_uint4(__vsub4(out[j][0], centre), __vsub4(out[j][1], centre), __vsub4(out[j][2], centre),
                          __vsub4(out[j][3], centre));
      dst[1] = make_uint4(__vsub4(out[j][4], centre), __vsub4(out[j][5], centre), __vsub4(out[j][6], centre),
                          __vsub4(out[j][7], centre));
    }
    __syncwarp();
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const int kc = st * 256 + c * 32;
      if (kc >= a.KP) break;                // the same for every lane: past the codes' last word
      const unsigned char *r0 = s + g * WROW + c * 32 + tig * 4, *r1 = r0 + 8 * WROW;
      const u32 a0 = *(const u32 *)r0, a1 = *(const u32 *)r1, a2 = *(const u32 *)(r0 + 16),
                a3 = *(const u32 *)(r1 + 16);
#pragma unroll
      for (int t = 0; t < TMI; ++t) {
        const int m = m0 + t * 8 + g;
        u32 b0 = 0u, b1 = 0u;
        if (m < a.M) {
          const signed char *row = a.a8 + (i64)m * a.KP + kc + tig * 4;
          b0 = __ldg((const u32 *)row);
          b1 = __ldg((const u32 *)(row + 16));
        }
        mma_s8(acc[t], a0, a1, a2, a3, b0, b1);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < TMI; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) {           // C fragment: (row g or g+8 = channel, column 2*tig + e%2 = token)
      const int n = nt * 16 + g + (e >= 2 ? 8 : 0), m = m0 + t * 8 + 2 * tig + (e & 1);
      if (n < a.N && m < a.M) a.acc[(i64)m * a.ldacc + n] = acc[t][e];
    }
}
#endif
