// Reduction of the stacked GEMM's plane products into y (or the integer accumulators), one thread per
// (token m, channel n): per K group g,  acc = sum_{i<P, j<Q} 2^(i+j) * C[g][i*N + n][j*M + m],
// then group_term (common.cuh: exact zero-point correction, times the weight scale) summed over groups,
// times the token's scale, plus bias, stored as f32/f16/bf16 -- the arithmetic of the bmma epilogue.
struct ReduceArgs {
  Args e;               // epilogue inputs and output as for the bmma family (wt, act unused)
  const int *c;         // int32 [G][P*N][ldc]
  long long ldc;
};
static_assert(sizeof(ReduceArgs) == 152, "ReduceArgs must match its ctypes mirror in launch.py");

extern "C" __global__ void __launch_bounds__(256) KERNEL_NAME(ReduceArgs r) {
  const Args &a = r.e;
  const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (i64)a.M * a.N) return;
  const int m = (int)(idx % a.M), n = (int)(idx / a.M);   // m fastest: reads along C rows coalesce
  float part = 0.f;
  for (int grp = 0; grp < a.G; ++grp) {
    const int *cg = r.c + (i64)grp * P * a.N * r.ldc;
    int acc = 0;   // fits: ops._check_planes bounds (2^Q-1)(2^P-1)*group bits below 2^31
#pragma unroll
    for (int i = 0; i < P; ++i)
#pragma unroll
      for (int j = 0; j < Q; ++j) acc += cg[((i64)i * a.N + n) * r.ldc + (i64)j * a.M + m] << (i + j);
    if (a.mode == 0) ((int *)a.out)[((i64)m * a.N + n) * a.G + grp] = acc;
    else part += group_term(a, n, m, grp, acc);
  }
  if (a.mode == 0) return;
  float y = part * a.a_scale[m];
  if (a.bias) y += a.bias[n];
  store_y(a.out, a.mode, (i64)m * a.N + n, y);
}
