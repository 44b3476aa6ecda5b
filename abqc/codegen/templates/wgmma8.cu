// abqc W(P)A8 GEMM on Hopper's INT8 warpgroup MMA (family "wgmma8", sm_90a, per-channel weights), the
// bit-plane weights unpacked to bytes in registers: the INT8 tensor cores (~2,000 TOPS) instead of P*Q
// binary products, and weights that cross HBM as P bits, not 8. The generator prepends P (weight planes),
// TN (tokens per block = the MMA's N), WGS (consumer warpgroups, 64 channels each), NS (pipeline stages)
// and common.cuh.
//
// Y^T = W * A^T as wgmma.mma_async m64nTNk32 .u8.u8 -> s32: A = 64 channels of uncentred weight codes from
// registers, B = TN tokens of uncentred activation codes (quant_pack.cu's U8_TILED output) from shared
// memory. The accumulator is sum_k u_a * u_w, the bit-plane kernels' integer, so the epilogue is theirs.
//
// K order. Lane (g, t) of a warp holds, per plane, the tiled layout's fragment: rows g and g+8, words t and
// t+4 of a 256-wide step (abqc.codegen.layout). The k32 MMA's A register r of chunk c wants 4 bytes of one
// row. A dot product does not care how K is ordered as long as both sides agree, so this kernel reads bit
// 8e + c of word t (t+4) as byte e of chunk c, half 0 (1), and the activation codes are stored in the same
// order: the code of k = 256s + 128h + 32t + 8e + c sits at chunk 8s + c, byte 16h + 4t + e. Unpacking a
// register then costs one shift and one masked OR per plane: (w >> (c - i)) & (0x01010101 << i).
//
// Pipeline: one producer warp streams, per 256-wide step, the block's weight tiles (WGS*4 x P*512 bytes)
// and the step's 8 activation chunks (8 x TN rows x 32 bytes, already in the MMA's core-matrix order) into
// a stage by bulk copies completing an mbarrier; consumer warps unpack, issue the step's 8 MMAs, and free
// the previous step's stage once its MMAs are done.
#define NACC (TN / 2)            // accumulator registers per thread of one m64nTN product
#define WTILES (4 * WGS)         // 16-channel tiles per block
#define A_STEP (TN * 256)        // activation bytes of a step: 8 chunks x TN rows x 32 bytes
#define W_STEP (WTILES * P * 512)
#define STAGE_BYTES (A_STEP + W_STEP)

__device__ __forceinline__ void wgmma_u8(int (&d)[NACC], const u32 (&a)[4], unsigned long long desc) {
#if TN == 32
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k32.s32.u8.u8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
      "{%16, %17, %18, %19}, %20, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
#endif
#if TN == 64
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.s32.u8.u8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
#endif
#if TN == 128
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.u8.u8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
#endif
}

// Chunk c's A registers from a plane fragment set: bit 8e + c of each word -> byte e, plane i -> bit i.
template <int c>
__device__ __forceinline__ void unpack_chunk(u32 (&r)[4], const uint4 (&x)[P]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    u32 v = 0u;
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const u32 w = j == 0 ? x[i].x : j == 1 ? x[i].y : j == 2 ? x[i].z : x[i].w;
      const u32 s = c >= i ? (w >> (c - i)) : (w << (i - c));
      v |= s & (0x01010101u << i);
    }
    r[j] = v;
  }
}

// Pins a register's value before the wgmma fence: the unpack's last write must not sink into the MMA
// group (ptxas would then serialize every MMA, C7513).
__device__ __forceinline__ void pin(u32 &r) { asm volatile("" : "+r"(r)::"memory"); }

template <int c>
__device__ __forceinline__ void unpack_all(u32 (&af)[8][4], const uint4 (&x)[P]) {
  if constexpr (c < 8) {
    unpack_chunk<c>(af[c], x);
#pragma unroll
    for (int j = 0; j < 4; ++j) pin(af[c][j]);
    unpack_all<c + 1>(af, x);
  }
}

// One 256-wide step: unpack the warp's weight fragment of the stage, then its 8 MMAs as one group.
__device__ __forceinline__ void step(int (&acc)[NACC], u32 (&af)[8][4], const unsigned char *stage, int tile,
                                     int lane) {
  uint4 x[P];
  const uint4 *ws = (const uint4 *)(stage + A_STEP) + tile * (P * 32) + lane;
#pragma unroll
  for (int i = 0; i < P; ++i) x[i] = ws[i * 32];
  unpack_all<0>(af, x);
  unsigned long long desc[8];
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    desc[c] = wg_desc(stage + c * (TN * 32));
    asm volatile("" : "+l"(desc[c])::"memory");
  }
  wgmma_fence();
#pragma unroll
  for (int c = 0; c < 8; ++c) wgmma_u8(acc, af[c], desc[c]);
  wgmma_commit();
}

extern "C" __global__ void __launch_bounds__(128 * WGS + 32, 1) KERNEL_NAME(const Args a) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ unsigned long long full[NS], empty[NS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nt0 = blockIdx.x * WTILES, m0 = blockIdx.y * TN, S = a.SG;
  if (threadIdx.x == 0) {
    for (int s = 0; s < NS; ++s) { mbar_init(&full[s], 1); mbar_init(&empty[s], 4 * WGS); }
    mbar_init_fence();
  }
  __syncthreads();
  if (warp == 4 * WGS) {   // the producer warp: one lane issues every copy
    if (lane == 0) {
      const int mpad = (a.M + 7) & ~7, rows = min(TN, mpad - m0);
      const int tiles = min(WTILES, ((a.N + 15) >> 4) - nt0);   // channel tiles of this block inside N
      const unsigned char *act = (const unsigned char *)a.act;
      pdl_wait();   // the activation codes come from the quantizer launched just before
      for (int s = 0; s < S; ++s) {
        const int st = s % NS;
        if (s >= NS) mbar_wait(&empty[st], (s / NS - 1) & 1);
        unsigned char *stage = smem + st * STAGE_BYTES;
        mbar_expect_tx(&full[st], 8 * rows * 32 + tiles * P * 512);
        for (int c = 0; c < 8; ++c)
          bulk_load(stage + c * (TN * 32), act + ((i64)(8 * s + c) * mpad + m0) * 32, rows * 32, &full[st]);
        for (int t = 0; t < tiles; ++t)
          bulk_load(stage + A_STEP + t * (P * 512), a.wt + ((i64)(nt0 + t) * S + s) * (P * 32), P * 512, &full[st]);
      }
    }
    return;
  }
  // Rows of B past M (up to the block's TN) and weight tiles past N hold stale bytes: they only reach
  // accumulator columns / rows that are never stored.
  int acc[NACC];
#pragma unroll
  for (int r = 0; r < NACC; ++r) acc[r] = 0;
  // Two A register sets alternate so a step's unpack overlaps the previous step's MMAs (wait<1>). The loop
  // body stays one straight pair of steps: a guarded second step (or a runtime register-set index) makes
  // ptxas serialize every MMA (C7513), so an odd step count runs step 0 alone first.
  u32 af0[8][4], af1[8][4];
  const int odd = S & 1;
  if (odd) {   // an odd step count: step 0 alone first, in the second register set
    mbar_wait(&full[0], 0);
    step(acc, af1, smem, warp, lane);
  }
  for (int s = odd; s < S; s += 2) {
    {
      const int st = s % NS;
      mbar_wait(&full[st], (s / NS) & 1);
      step(acc, af0, smem + st * STAGE_BYTES, warp, lane);
      wgmma_wait<1>();
      __syncwarp();
      if (s > 0 && lane == 0) mbar_arrive(&empty[(s - 1) % NS]);
    }
    {
      const int si = s + 1;
      const int st = si % NS;
      mbar_wait(&full[st], (si / NS) & 1);
      step(acc, af1, smem + st * STAGE_BYTES, warp, lane);
      wgmma_wait<1>();
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[s % NS]);
    }
  }
  wgmma_wait<0>();
  pdl_wait();
  store_wg_tile<NACC>(a, acc, (nt0 + warp) * 16, m0, lane);
}
