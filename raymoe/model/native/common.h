/* What raymoe's kernels share: bfloat16 <-> float32 and a vectorisable exp. */
#ifndef RAYMOE_NATIVE_COMMON_H
#define RAYMOE_NATIVE_COMMON_H

#include <stdint.h>
#include <string.h>

typedef uint16_t bf16;

static inline float from_bf16(bf16 h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline bf16 to_bf16(float f) {  /* round to nearest even, as torch does */
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);  /* NaN stays NaN */
  return (bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline float from_f32(float f) { return f; }
static inline float to_f32(float f) { return f; }

/* exp(x) for x <= 0, vectorisable: 2^n * p(r) with Cephes' expf polynomial (about 1 ulp). */
static inline float exp_nonpos(float x) {
  x = x < -87.f ? -87.f : x;
  float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  /* to nearest: 1.5 * 2^23 */
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  int32_t e = ((int32_t)n + 127) << 23;
  float s;
  memcpy(&s, &e, 4);
  return p * s;
}

#endif
