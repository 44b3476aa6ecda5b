// The per-token activation grid of the packers (quant_pack.cu, hadamard.cu's fused build): a row's scale
// and zero point from its min and max, and a value's code, with abqc.quant's float32 expressions (IEEE
// division), so every packer's codes equal the CPU reference's. (gemv.cu's in-kernel quantizer gets the
// same values through its exact division helper, div_rn.) Needs Q (activation bits).
__device__ __forceinline__ void act_grid(float lo, float hi, int symmetric, float &scale, float &zero) {
  const int qmax = (1 << Q) - 1;
  if (symmetric) {
    const float absmax = fmaxf(fabsf(hi), fabsf(lo));
    scale = fmaxf(absmax / (float)((1 << (Q - 1)) - 1), 1e-8f);
    zero = (float)(1 << (Q - 1));
  } else {
    const float mn = fminf(lo, 0.f), mx = fmaxf(hi, 0.f);
    scale = fmaxf((mx - mn) / (float)qmax, 1e-8f);
    zero = fminf(fmaxf(rintf(-mn / scale), 0.f), (float)qmax);
  }
}

__device__ __forceinline__ int act_code(float v, float scale, float zero) {
  return (int)fminf(fmaxf(rintf(v / scale) + zero, 0.f), (float)((1 << Q) - 1));
}
