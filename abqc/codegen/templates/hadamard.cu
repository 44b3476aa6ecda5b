// abqc online Hadamard: y = x H_n^T / sqrt(n) per row, H_n = H_(2^k) (Sylvester) kron B (m x m).
// One block per row; the row lives in shared memory as float32 (n floats of dynamic shared memory).
// Stage 1, the fast Walsh-Hadamard transform over the 2^k factor: log2(2^k) butterfly stages, each
// thread owning disjoint pairs (i, i + h) of one column, so a stage needs no atomics. Stage 2, the
// dense m x m factor straight from shared memory to global. Same butterflies as the torch reference,
// float32 accumulation. The generator prepends KERNEL_NAME.
typedef unsigned int u32;
typedef long long i64;

struct HArgs {
  const void *x; void *out;          // [rows][n] contiguous, dtype 1 f32, 2 f16, 3 bf16
  const float *block;                // [m][m]
  int rows, pow2, m, dtype;
  float scale;                       // 1 / sqrt(n)
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

extern "C" __global__ void __launch_bounds__(256) KERNEL_NAME(const HArgs a) {
  extern __shared__ float s[];
  const int m = a.m, n = a.pow2 * a.m;
  const i64 base = (i64)blockIdx.x * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = load_elem(a.x, base + i, a.dtype);
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
  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    const int r = t / m, c = t % m;
    const float *row = s + r * m, *b = a.block + (i64)c * m;
    float acc = 0.f;
    for (int k = 0; k < m; ++k) acc = fmaf(row[k], __ldg(b + k), acc);
    store_elem(a.out, base + t, acc * a.scale, a.dtype);
  }
}
