/* RMSNorm of rows in one call (torch's composite costs ~20 us a call at a decode step's sizes).

   x      rows of n values: row (t, h) at x + t * stride + h * n, for t < T, h < H
   w      [H or 1, n] weights: row h's at w + h * w_stride (w_stride 0: one weight for every row)
   out    [T, H, n] contiguous

   out = w * to_T(x * 1 / sqrt(mean(x^2) + eps)), the mean and the product in float32, as raymoe's
   RMSNorm computes (float32 inputs: no rounding between). Each row alone: its bits do not depend
   on the others. Returns 0. */
#include <math.h>

#include "common.h"

#define NORM(NAME, T, LOAD, STORE)                                                                    \
int NAME(const T* x, int64_t T_, int64_t H, int64_t n, int64_t stride, const T* w, int64_t w_stride,  \
         float eps, T* out) {                                                                          \
  for (int64_t t = 0; t < T_; t++)                                                                     \
    for (int64_t h = 0; h < H; h++) {                                                                  \
      const T* xr = x + t * stride + h * n;                                                            \
      const T* wr = w + h * w_stride;                                                                  \
      T* o = out + (t * H + h) * n;                                                                    \
      float ss = 0.f;                                                                                  \
      _Pragma("omp simd reduction(+:ss)")                                                              \
      for (int64_t j = 0; j < n; j++) { float v = LOAD(xr[j]); ss += v * v; }                          \
      float r = 1.f / sqrtf(ss / (float)n + eps);                                                      \
      _Pragma("omp simd")                                                                              \
      for (int64_t j = 0; j < n; j++) o[j] = STORE(LOAD(wr[j]) * LOAD(STORE(LOAD(xr[j]) * r)));        \
    }                                                                                                  \
  return 0;                                                                                            \
}

NORM(rms_norm_f32, float, from_f32, to_f32)
NORM(rms_norm_bf16, bf16, from_bf16, to_bf16)
