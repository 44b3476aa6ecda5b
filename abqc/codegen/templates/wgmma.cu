// abqc bit-plane GEMM on Hopper warpgroup MMA (family "wgmma", sm_90a, per-channel weights). The
// generator prepends the config (P weight planes, Q activation planes, TN tokens per block = the MMA's
// N, KC K steps of 256 bits per pipeline stage, WGS warpgroups per block) and common.cuh.
//
// Every product is wgmma.mma_async m64nTNk256 .b1 AND+popc: A = 64 channels of one weight plane (warp w
// of a warpgroup holds channel tile w; its fragment is the tiled layout's uint4, so weights need no new
// layout), from registers; B = TN tokens of one activation plane, from shared memory through a matrix
// descriptor. The block stages KC steps of its channel tiles' weights and of all Q activation planes per
// cp.async stage (two stages in flight). Products of equal shift s = i + j chain on one accumulator over
// the stage's steps; while the tensor cores run the chain of shift s, the finished chain of shift s-1 is
// folded into the block's total (total += acc << (s-1)). Folding per stage keeps one accumulator set per
// output instead of P*Q (the register file caps a stacked-plane tile at ~64 x 32 outputs, too small to
// keep L2 traffic below the tensor cores' appetite) at P+Q-1 integer adds per output and stage.
#define NACC (TN / 2)           // accumulator registers per thread of one m64nTN product
#define S_ACC (P + Q - 1)
#define WTILES (4 * WGS)        // 16-channel tiles per block
#define W_STAGE (KC * WTILES * P * 512)
#define A_STAGE (KC * Q * TN * 32)
#define STAGE_BYTES (W_STAGE + A_STAGE)

__device__ __forceinline__ void wgmma_b1(int (&d)[NACC], const uint4 &a, unsigned long long desc, int accumulate) {
#if TN == 32
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k256.s32.b1.b1.and.popc "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
      "{%16, %17, %18, %19}, %20, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "l"(desc), "r"(accumulate));
#endif
#if TN == 64
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k256.s32.b1.b1.and.popc "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "l"(desc), "r"(accumulate));
#endif
#if TN == 128
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k256.s32.b1.b1.and.popc "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "l"(desc), "r"(accumulate));
#endif
}

// Stage chunk c (steps c*KC ..) into one stage: weights [KC][WTILES][P][32] uint4 (each (tile, step) is
// 512*P contiguous bytes of the tiled layout), then activations [KC][Q][TN rows x 32 bytes, core-matrix
// order]. Past K, N or M: zeros (a zero plane adds nothing to AND+popc).
__device__ __forceinline__ void load_chunk(const Args &a, unsigned char *stage, int c, int nt0, int m0) {
  const int S = a.SG, NT = (a.N + 15) >> 4, kw = a.gw;
  uint4 *ws = (uint4 *)stage;
  for (int idx = threadIdx.x; idx < KC * WTILES * P * 32; idx += blockDim.x) {
    const int l = idx % (P * 32), rest = idx / (P * 32), tile = rest % WTILES, kk = rest / WTILES;
    const int s = c * KC + kk, nt = nt0 + tile;
    const bool v = s < S && nt < NT;
    cp_async16z(ws + idx, v ? a.wt + ((i64)nt * S + s) * (P * 32) + l : a.wt, v);
  }
  unsigned char *as = stage + W_STAGE;
  if ((kw & 3) == 0) {   // rows 16-byte aligned: a half row (4 words) is one copy
    for (int idx = threadIdx.x; idx < KC * Q * TN * 2; idx += blockDim.x) {
      const int h = idx & 1, r = (idx >> 1) % TN, jk = (idx >> 1) / TN, j = jk % Q, kk = jk / Q;
      const int w = (c * KC + kk) * 8 + h * 4;
      const bool v = m0 + r < a.M && w < kw;
      cp_async16z(as + (kk * Q + j) * (TN * 32) + (r >> 3) * 256 + h * 128 + (r & 7) * 16,
                  v ? a.act + ((i64)j * a.M + m0 + r) * kw + w : a.act, v);
    }
  } else {
    for (int idx = threadIdx.x; idx < KC * Q * TN * 8; idx += blockDim.x) {
      const int x = idx & 7, r = (idx >> 3) % TN, jk = (idx >> 3) / TN, j = jk % Q, kk = jk / Q;
      const int w = (c * KC + kk) * 8 + x;
      const bool v = m0 + r < a.M && w < kw;
      cp_async4z(as + (kk * Q + j) * (TN * 32) + (r >> 3) * 256 + (x >> 2) * 128 + (r & 7) * 16 + (x & 3) * 4,
                 v ? a.act + ((i64)j * a.M + m0 + r) * kw + w : a.act, v);
    }
  }
}

// The chain of shift s over one stage: every (i, j = s - i) product of its KC steps into d (af: the
// warp's weight fragments of the stage, loaded once from shared memory: a fragment load per MMA would
// cost more than an m64n64 MMA takes).
template <int s>
__device__ __forceinline__ void chain(int (&d)[NACC], const uint4 (&af)[P][KC], const unsigned char *stage) {
  const unsigned char *as = stage + W_STAGE;
  wgmma_fence();
  bool first = true;
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const int j = s - i;
    if (j < 0 || j >= Q) continue;
#pragma unroll
    for (int kk = 0; kk < KC; ++kk) {
      wgmma_b1(d, af[i][kk], wg_desc(as + (kk * Q + j) * (TN * 32)), first ? 0 : 1);
      first = false;
    }
  }
  wgmma_commit();
}

__device__ __forceinline__ void fold(int (&total)[NACC], const int (&d)[NACC], int s) {
#pragma unroll
  for (int r = 0; r < NACC; ++r) total[r] += d[r] << s;
}

// Shifts s .. S_ACC-1 of one stage, the chain of s-1 (in acc[(s-1)&1]) still running.
template <int s>
__device__ __forceinline__ void shifts(int (&total)[NACC], int (&acc)[2][NACC], const uint4 (&af)[P][KC],
                                       const unsigned char *stage) {
  if constexpr (s < S_ACC) {
    chain<s>(acc[s & 1], af, stage);
    if constexpr (s > 0) {
      wgmma_wait<1>();
      fold(total, acc[(s - 1) & 1], s - 1);
    }
    shifts<s + 1>(total, acc, af, stage);
  } else {
    wgmma_wait<0>();
    fold(total, acc[(S_ACC - 1) & 1], S_ACC - 1);
  }
}

extern "C" __global__ void __launch_bounds__(128 * WGS, 1) KERNEL_NAME(const Args a) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nt0 = blockIdx.x * WTILES, m0 = blockIdx.y * TN;
  const int chunks = (a.SG + KC - 1) / KC;
  int total[NACC], acc[2][NACC];
#pragma unroll
  for (int r = 0; r < NACC; ++r) total[r] = 0;

  load_chunk(a, smem, 0, nt0, m0);
  asm volatile("cp.async.commit_group;\n" ::);
  for (int c = 0; c < chunks; ++c) {
    unsigned char *stage = smem + (c & 1) * STAGE_BYTES;
    // the other stage held chunk c-1, finished by every warp at the previous iteration's barrier
    if (c + 1 < chunks) load_chunk(a, smem + ((c + 1) & 1) * STAGE_BYTES, c + 1, nt0, m0);
    asm volatile("cp.async.commit_group;\n" ::);
    asm volatile("cp.async.wait_group 1;\n" ::);
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");   // cp.async writes -> wgmma's async proxy
    __syncthreads();
    uint4 af[P][KC];
    const uint4 *ws = (const uint4 *)stage + warp * (P * 32) + lane;
#pragma unroll
    for (int i = 0; i < P; ++i)
#pragma unroll
      for (int kk = 0; kk < KC; ++kk) af[i][kk] = ws[kk * (WTILES * P * 32) + i * 32];
    shifts<0>(total, acc, af, stage);
    __syncthreads();
  }

  store_wg_tile<NACC>(a, total, (nt0 + warp) * 16, m0, lane);
}
