/* One MoE layer's expert FFNs (SwiGLU) on rows already sorted by expert, in one call.

   rows     [P, H]          contiguous groups: counts[e] rows for held expert e, in stack order
   gate_up  [E, H, 2I]      each expert's gate and up projections, transposed (rows @ gate_up[e])
   down     [E, I, H]       its down projection, transposed
   out      [P, H]          silu(rows @ gate) * (rows @ up) @ down, row by row, for the groups of at
                            most `limit` rows (the rows of larger ones are left as they are)
   scratch  [TILE * (2H + 3I)] float32 work space (TILE: 4)

   Rows run in tiles of up to TILE that share each weight load; every output element is a chain of
   fused multiply-adds over k in ascending order, whatever the tile, so a row's result does not
   depend on the other rows of the call. Math in float32; bfloat16 operands are widened on load and
   the result rounded once (to nearest even). Returns 0. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define TILE 4
#ifdef __AVX512F__
#define VB 64  /* bytes of a vector register */
#else
#define VB 32
#endif
#define VL (VB / 4)   /* floats in a vector */
#define NV 4          /* vectors of output columns a tile keeps in registers */
#define NB (NV * VL)

typedef uint16_t bf16;
typedef float vf __attribute__((vector_size(VB)));
typedef uint16_t vh __attribute__((vector_size(VB / 2)));
typedef uint32_t vu __attribute__((vector_size(VB)));

static inline float from_bf16(bf16 h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline bf16 to_bf16(float f) {
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);
  return (bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline float from_f32(float f) { return f; }
static inline float to_f32(float f) { return f; }
static inline vf vload_float(const float* p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline vf vload_bf16(const bf16* p) {
  vh h; memcpy(&h, p, sizeof h);
  vu u = __builtin_convertvector(h, vu) << 16;
  vf f; memcpy(&f, &u, sizeof f); return f;
}

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

/* act[i] = silu(gate[i]) * up[i] for gate = h[:I], up = h[I:2I]; sigmoid from exp(-|g|) <= 1. */
static inline void silu_mul(const float* h, int64_t I, float* act) {
#pragma omp simd
  for (int64_t i = 0; i < I; i++) {
    float g = h[i], e = exp_nonpos(g < 0.f ? g : -g), sig = g < 0.f ? e / (1.f + e) : 1.f / (1.f + e);
    act[i] = g * sig * h[I + i];
  }
}

/* C[r, :N] = A[r, :K] @ B[:K, :N] for r < R (R a constant 1..TILE): A float32 (row stride lda),
   B of type T (row stride N), C float32 (row stride ldc). Each element: fused multiply-adds over
   k ascending (the vector and the scalar tail alike). */
#define GEMM(NAME, T, LOAD, R)                                                                        \
static inline void NAME(const float* A, int64_t lda, const T* B, int64_t K, int64_t N, float* C, int64_t ldc) { \
  int64_t n0 = 0;                                                                                      \
  for (; n0 + NB <= N; n0 += NB) {                                                                     \
    vf acc[R][NV];                                                                                     \
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)                                                \
      _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[r][v] = (vf){0};                        \
    for (int64_t k = 0; k < K; k++) {                                                                  \
      vf b[NV];                                                                                        \
      _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) b[v] = vload_##T(B + k * N + n0 + v * VL);  \
      _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {                                            \
        float a = A[r * lda + k];                                                                      \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[r][v] = a * b[v] + acc[r][v];         \
      }                                                                                                \
    }                                                                                                  \
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)                                                \
      _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) memcpy(C + r * ldc + n0 + v * VL, &acc[r][v], VB); \
  }                                                                                                    \
  for (int r = 0; r < R; r++)                                                                          \
    for (int64_t n = n0; n < N; n++) {                                                                 \
      float acc = 0.f;                                                                                 \
      for (int64_t k = 0; k < K; k++) acc = __builtin_fmaf(A[r * lda + k], LOAD(B[k * N + n]), acc);   \
      C[r * ldc + n] = acc;                                                                            \
    }                                                                                                  \
}

#define ALL_GEMMS(T, LOAD)                                                                            \
GEMM(gemm1_##T, T, LOAD, 1) GEMM(gemm2_##T, T, LOAD, 2) GEMM(gemm3_##T, T, LOAD, 3) GEMM(gemm4_##T, T, LOAD, 4) \
GEMM(gemm5_##T, T, LOAD, 5) GEMM(gemm6_##T, T, LOAD, 6) GEMM(gemm7_##T, T, LOAD, 7) GEMM(gemm8_##T, T, LOAD, 8) \
static inline void gemm_##T(int R, const float* A, int64_t lda, const T* B, int64_t K, int64_t N, float* C, int64_t ldc) { \
  switch (R) {                                                                                         \
    case 1: gemm1_##T(A, lda, B, K, N, C, ldc); break;                                                 \
    case 2: gemm2_##T(A, lda, B, K, N, C, ldc); break;                                                 \
    case 3: gemm3_##T(A, lda, B, K, N, C, ldc); break;                                                 \
    case 4: gemm4_##T(A, lda, B, K, N, C, ldc); break;                                                 \
    case 5: gemm5_##T(A, lda, B, K, N, C, ldc); break;                                                 \
    case 6: gemm6_##T(A, lda, B, K, N, C, ldc); break;                                                 \
    case 7: gemm7_##T(A, lda, B, K, N, C, ldc); break;                                                 \
    default: gemm8_##T(A, lda, B, K, N, C, ldc);                                                       \
  }                                                                                                    \
}

ALL_GEMMS(float, from_f32)
ALL_GEMMS(bf16, from_bf16)

#define EXPERTS(NAME, T, LOAD, STORE)                                                                 \
int NAME(const T* rows, int64_t H, const int64_t* counts, int64_t E, const T* gate_up, const T* down,  \
         int64_t I, int64_t limit, T* out, float* scratch) {                                           \
  float *x = scratch, *h = scratch + TILE * H, *act = h + TILE * 2 * I, *y = act + TILE * I;               \
  int64_t start = 0;                                                                                   \
  for (int64_t e = 0; e < E; e++) {                                                                    \
    const T *gu = gate_up + e * H * 2 * I, *dn = down + e * I * H;                                     \
    int64_t stop = counts[e] <= limit ? start + counts[e] : start;  /* larger groups: left alone */   \
    for (int64_t r0 = start; r0 < stop; r0 += TILE) {                                     \
      int R = (int)(stop - r0 < TILE ? stop - r0 : TILE);                                              \
      for (int64_t j = 0; j < R * H; j++) x[j] = LOAD(rows[r0 * H + j]);                               \
      gemm_##T(R, x, H, gu, H, 2 * I, h, 2 * I);                                                       \
      for (int r = 0; r < R; r++) silu_mul(h + r * 2 * I, I, act + r * I);                             \
      gemm_##T(R, act, I, dn, I, H, y, H);                                                             \
      for (int64_t j = 0; j < R * H; j++) out[r0 * H + j] = STORE(y[j]);                               \
    }                                                                                                  \
    start += counts[e];                                                                                \
  }                                                                                                    \
  return 0;                                                                                            \
}

EXPERTS(experts_f32, float, from_f32, to_f32)
EXPERTS(experts_bf16, bf16, from_bf16, to_bf16)
