// abqc online Hadamard: y = x H_n^T / sqrt(n) per row, H_n = H_(2^k) (Sylvester) kron B (m x m), and,
// built with HADAMARD_PACK (and Q), the activation quantizer fused behind it.
// Grid (rows, column blocks). Every block stages its row in shared memory as float32 and runs stage 1,
// the fast Walsh-Hadamard transform over the 2^k factor (log2(2^k) butterfly stages, each thread owning
// disjoint pairs (i, i + h) of one column: no atomics). Stage 2, the dense m x m factor, is split over
// the row's blocks by output column c: block b owns columns [b*cols, (b+1)*cols) for all 2^k rows r of
// the [2^k][m] view, staging `sub` rows of B at a time (stride m + 4: conflict-free, 16-byte aligned).
// At decode (a few rows) a row's m x n multiply-adds so spread over tens of SMs instead of one.
// HADAMARD_PACK: the last block of a row to finish (a per-row counter, reset by that block) reads the
// row back as stored (in x's dtype, through L2) and quantizes and packs it exactly as quant_pack.cu does
// (same float32 arithmetic, same outputs: planes [Q][rows][KW], code sums, scale, zero), so the fused
// path equals hadamard then quant_pack bit for bit, in one launch. The generator prepends KERNEL_NAME.
typedef unsigned int u32;
typedef long long i64;

struct HArgs {
  const void *x; void *out;          // [rows][n] contiguous, dtype 1 f32, 2 f16, 3 bf16
  const float *block;                // [m][m]
  int rows, pow2, m, dtype;
  float scale;                       // 1 / sqrt(n)
  int cols, sub;                     // B columns per block, B rows staged in shared memory at a time
  // HADAMARD_PACK builds only
  int *counter;                      // [rows], zero between launches: blocks of the row that are done
  u32 *planes; int *sums;            // [Q][rows][KW]; [rows][G] (G == 1: [rows][1])
  float *a_scale; int *a_zero;       // [rows]
  int KW, gw, G, symmetric;
};

__device__ __forceinline__ float load_elem(const void *p, i64 i, int dtype) {
  if (dtype == 1) return ((const float *)p)[i];
  const unsigned short h = ((const unsigned short *)p)[i];
  if (dtype == 3) return __uint_as_float(((u32)h) << 16);
  float v;
  asm("cvt.f32.f16 %0, %1;" : "=f"(v) : "h"(h));
  return v;
}

__device__ __forceinline__ void store_elem(void *p, i64 i, float v, int dtype) {
  if (dtype == 1) { ((float *)p)[i] = v; return; }
  unsigned short h;
  if (dtype == 3) asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
  else asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
  ((unsigned short *)p)[i] = h;
}

// Another block's stores, read through L2 (L1 is not coherent across SMs).
__device__ __forceinline__ float load_elem_l2(const void *p, i64 i, int dtype) {
  if (dtype == 1) return __ldcg((const float *)p + i);
  const unsigned short h = __ldcg((const unsigned short *)p + i);
  if (dtype == 3) return __uint_as_float(((u32)h) << 16);
  float v;
  asm("cvt.f32.f16 %0, %1;" : "=f"(v) : "h"(h));
  return v;
}

// s[0:n) = row `base` of p as float32. 16-byte loads, eight per thread issued before any is used: a
// plain element loop is a chain of dependent L2 round trips (measured ~25 us for an 11008-wide row).
template <bool L2ONLY>
__device__ __forceinline__ void load_row(float *s, const void *p, i64 base, int n, int dtype) {
  const int esz = dtype == 1 ? 4 : 2, per = 16 / esz;
  const char *row = (const char *)p + base * esz;
  if (n % per == 0 && (((unsigned long long)row) & 15) == 0) {
    const uint4 *src = (const uint4 *)row;
    const int nv = n / per;
    for (int v0 = threadIdx.x; v0 < nv; v0 += 8 * blockDim.x) {
      uint4 r[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int v = v0 + u * blockDim.x;
        if (v < nv) r[u] = L2ONLY ? __ldcg(src + v) : __ldg(src + v);
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int v = v0 + u * blockDim.x;
        if (v >= nv) break;
        const u32 w[4] = {r[u].x, r[u].y, r[u].z, r[u].w};
        if (dtype == 1) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[v * 4 + e] = __uint_as_float(w[e]);
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const unsigned short h0 = (unsigned short)(w[e] & 0xffff), h1 = (unsigned short)(w[e] >> 16);
            float f0, f1;
            if (dtype == 3) { f0 = __uint_as_float(((u32)h0) << 16); f1 = __uint_as_float(((u32)h1) << 16); }
            else {
              asm("cvt.f32.f16 %0, %1;" : "=f"(f0) : "h"(h0));
              asm("cvt.f32.f16 %0, %1;" : "=f"(f1) : "h"(h1));
            }
            s[v * 8 + 2 * e] = f0; s[v * 8 + 2 * e + 1] = f1;
          }
        }
      }
    }
    return;
  }
  for (int i0 = threadIdx.x; i0 < n; i0 += 8 * blockDim.x) {   // unaligned rows: 8 scalar loads in flight
    float v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int i = i0 + u * blockDim.x;
      if (i < n) v[u] = L2ONLY ? load_elem_l2(p, base + i, dtype) : load_elem(p, base + i, dtype);
    }
#pragma unroll
    for (int u = 0; u < 8; ++u)
      if (i0 + u * blockDim.x < n) s[i0 + u * blockDim.x] = v[u];
  }
}

extern "C" __global__ void __launch_bounds__(256) KERNEL_NAME(const HArgs a) {
#if defined(HADAMARD_PACK) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");   // as quant_pack.cu: the GEMV may launch
#endif
  extern __shared__ float s[];       // the row (n floats), then `sub` rows of B (stride m + 4)
  const int m = a.m, n = a.pow2 * m, sb = m + 4;
  const i64 base = (i64)blockIdx.x * n;
  float *bs = s + n;
  load_row<false>(s, a.x, base, n, a.dtype);
  __syncthreads();
  for (int h = 1; h < a.pow2; h <<= 1) {
    for (int t = threadIdx.x; t < n / 2; t += blockDim.x) {
      const int col = t % m, pair = t / m;
      const int i = ((pair / h) * 2 * h + pair % h) * m + col, j = i + h * m;
      const float u = s[i], v = s[j];
      s[i] = u + v;
      s[j] = u - v;
    }
    __syncthreads();
  }
  const int c_begin = blockIdx.y * a.cols, c_end = min(m, c_begin + a.cols);
  for (int c0 = c_begin; c0 < c_end; c0 += a.sub) {
    const int cs = min(a.sub, c_end - c0);
    __syncthreads();                 // the previous slice's readers are done with bs
    for (int i = threadIdx.x; i < cs * m; i += blockDim.x) {
      const int r = i / m, k = i - r * m;
      bs[r * sb + k] = __ldg(a.block + (i64)(c0 + r) * m + k);
    }
    __syncthreads();
    for (int t = threadIdx.x; t < a.pow2 * cs; t += blockDim.x) {
      const int r = t / cs, cc = t - r * cs;   // lanes of a warp: a few r, consecutive c
      const float *xr = s + r * m, *b = bs + cc * sb;
      float acc = 0.f;
      if ((m & 3) == 0) {            // 16-byte shared loads (Paley orders are multiples of 4)
        float acc1 = 0.f, acc2 = 0.f, acc3 = 0.f;
        for (int k = 0; k < m; k += 4) {
          const float4 xv = *(const float4 *)(xr + k), bv = *(const float4 *)(b + k);
          acc = fmaf(xv.x, bv.x, acc); acc1 = fmaf(xv.y, bv.y, acc1);
          acc2 = fmaf(xv.z, bv.z, acc2); acc3 = fmaf(xv.w, bv.w, acc3);
        }
        acc = (acc + acc1) + (acc2 + acc3);
      } else {
        for (int k = 0; k < m; ++k) acc = fmaf(xr[k], b[k], acc);
      }
      store_elem(a.out, base + r * m + c0 + cc, acc * a.scale, a.dtype);
    }
  }
#ifdef HADAMARD_PACK
  __shared__ int last;
  __shared__ float smin[8], smax[8];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5, row = blockIdx.x;
  __threadfence();                   // this block's outputs reach L2 before the block is counted
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(a.counter + row, 1) == (int)gridDim.y - 1;
  __syncthreads();
  if (!last) return;
  if (threadIdx.x == 0) a.counter[row] = 0;   // every block of the row has been counted: reset for the next launch
  __threadfence();
  // the whole transformed row as stored (x's dtype), so the codes are those quant_pack.cu gives for it
  load_row<true>(s, a.out, base, n, a.dtype);
  int *gsum = (int *)bs;             // G group code sums
  for (int i = threadIdx.x; i < a.G; i += blockDim.x) gsum[i] = 0;
  __syncthreads();
  float lo = __int_as_float(0x7f800000), hi = __int_as_float(0xff800000);
  for (int i = threadIdx.x; i < n; i += blockDim.x) { lo = fminf(lo, s[i]); hi = fmaxf(hi, s[i]); }
  for (int o = 16; o; o >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
  if (lane == 0) { smin[warp] = lo; smax[warp] = hi; }
  __syncthreads();
  lo = smin[0]; hi = smax[0];
  for (int w = 1; w < nwarps; ++w) { lo = fminf(lo, smin[w]); hi = fmaxf(hi, smax[w]); }
  float scale, zero;                 // quant_pack.cu's grid (act_grid.cuh)
  act_grid(lo, hi, a.symmetric, scale, zero);
  if (threadIdx.x == 0) { a.a_scale[row] = scale; a.a_zero[row] = (int)zero; }
  int sum = 0;                       // per-channel: this lane's codes, reduced once per warp at the end
  for (int w = warp; w < a.KW; w += nwarps) {
    const int k = w * 32 + lane;
    int u = 0;
    if (k < n) u = act_code(s[k], scale, zero);
    u32 mine = 0;                    // lane j keeps plane j's word (LSB-first: lane l -> bit l)
#pragma unroll
    for (int j = 0; j < Q; ++j) {
      const u32 bits = __ballot_sync(0xffffffffu, (u >> j) & 1);
      if (lane == j) mine = bits;
    }
    if (lane < Q) a.planes[((i64)lane * a.rows + row) * a.KW + w] = mine;
    if (a.G == 1) { sum += u; continue; }
    int gs = u;
    for (int o = 16; o; o >>= 1) gs += __shfl_xor_sync(0xffffffffu, gs, o);
    if (lane == 0) atomicAdd(&gsum[w / a.gw], gs);
  }
  if (a.G == 1) {
    for (int o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) atomicAdd(&gsum[0], sum);
  }
  __syncthreads();
  for (int g = threadIdx.x; g < a.G; g += blockDim.x) a.sums[(i64)row * a.G + g] = gsum[g];
#endif
}
