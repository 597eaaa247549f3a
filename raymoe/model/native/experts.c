/* One MoE layer's expert FFNs (SwiGLU) on rows already sorted by expert, in one call.

   rows     [P, H]          contiguous groups: counts[e] rows for held expert e, in stack order
   gate_up  [E, H, 2I]      each expert's gate and up projections, transposed (rows @ gate_up[e])
   down     [E, I, H]       its down projection, transposed
   out      [P, H]          silu(rows @ gate) * (rows @ up) @ down, row by row, for the groups of at
                            most `limit` rows (the rows of larger ones are left as they are)
   scratch  [limit * (2H + 3I)] float32 work space

   Rows run in tiles of up to TILE that share each weight load, over blocks of columns whose weights
   stay in L1 for every tile; every output element is a chain of fused multiply-adds over k in
   ascending order, whatever the tile, so a row's result does not
   depend on the other rows of the call. Math in float32; bfloat16 operands are widened on load and
   the result rounded once (to nearest even). Returns 0. */
#include <math.h>

#include "common.h"

#define TILE 4
#ifdef __AVX512F__
#define VB 64  /* bytes of a vector register */
#else
#define VB 32
#endif
#define VL (VB / 4)   /* floats in a vector */
#define NV 4          /* vectors of output columns a tile keeps in registers */
#define NB (NV * VL)

typedef float vf __attribute__((vector_size(VB)));
typedef uint16_t vh __attribute__((vector_size(VB / 2)));
typedef uint32_t vu __attribute__((vector_size(VB)));

static inline vf vload_float(const float* p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline vf vload_bf16(const bf16* p) {
  vh h; memcpy(&h, p, sizeof h);
  vu u = __builtin_convertvector(h, vu) << 16;
  vf f; memcpy(&f, &u, sizeof f); return f;
}

/* act[i] = silu(gate[i]) * up[i] for gate = h[:I], up = h[I:2I]; sigmoid from exp(-|g|) <= 1. */
static inline void silu_mul(const float* h, int64_t I, float* act) {
#pragma omp simd
  for (int64_t i = 0; i < I; i++) {
    float g = h[i], e = exp_nonpos(g < 0.f ? g : -g), sig = g < 0.f ? e / (1.f + e) : 1.f / (1.f + e);
    act[i] = g * sig * h[I + i];
  }
}

/* One tile: C[r, n0:n0+NB] = A[r, :K] @ B[:K, n0:n0+NB] for r < R (R a constant 1..TILE), the
   accumulators in registers. A float32 (row stride lda), B of type T (row stride N), C float32
   (row stride ldc). Each element: fused multiply-adds over k ascending. */
#define TILE_KERNEL(NAME, T, R)                                                                       \
static inline void NAME(const float* A, int64_t lda, const T* B, int64_t K, int64_t N, int64_t n0,    \
                        float* C, int64_t ldc) {                                                       \
  vf acc[R][NV];                                                                                       \
  _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)                                                  \
    _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[r][v] = (vf){0};                          \
  for (int64_t k = 0; k < K; k++) {                                                                    \
    vf b[NV];                                                                                          \
    _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) b[v] = vload_##T(B + k * N + n0 + v * VL);    \
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {                                              \
      float a = A[r * lda + k];                                                                        \
      _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[r][v] = a * b[v] + acc[r][v];           \
    }                                                                                                  \
  }                                                                                                    \
  _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)                                                  \
    _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) memcpy(C + r * ldc + n0 + v * VL, &acc[r][v], VB); \
}

/* C[:M, :N] = A[:M, :K] @ B[:K, :N]: column blocks outer, tiles of rows inner, so a block of B
   (K x NB) is read from memory once and from L1 by the other tiles; the columns past the last
   whole block with the same chain of fused multiply-adds, one element at a time. */
#define GEMM(T, LOAD)                                                                                 \
TILE_KERNEL(tile1_##T, T, 1) TILE_KERNEL(tile2_##T, T, 2) TILE_KERNEL(tile3_##T, T, 3) TILE_KERNEL(tile4_##T, T, 4) \
static inline void gemm_##T(int64_t M, const float* A, int64_t lda, const T* B, int64_t K, int64_t N,  \
                            float* C, int64_t ldc) {                                                   \
  int64_t n0 = 0;                                                                                      \
  for (; n0 + NB <= N; n0 += NB)                                                                       \
    for (int64_t r0 = 0; r0 < M; r0 += TILE) {                                                         \
      const float* a = A + r0 * lda;                                                                   \
      float* c = C + r0 * ldc;                                                                         \
      switch (M - r0 < TILE ? M - r0 : TILE) {                                                         \
        case 1: tile1_##T(a, lda, B, K, N, n0, c, ldc); break;                                         \
        case 2: tile2_##T(a, lda, B, K, N, n0, c, ldc); break;                                         \
        case 3: tile3_##T(a, lda, B, K, N, n0, c, ldc); break;                                         \
        default: tile4_##T(a, lda, B, K, N, n0, c, ldc);                                               \
      }                                                                                                \
    }                                                                                                  \
  for (int64_t r = 0; r < M; r++)                                                                      \
    for (int64_t n = n0; n < N; n++) {                                                                 \
      float acc = 0.f;                                                                                 \
      for (int64_t k = 0; k < K; k++) acc = __builtin_fmaf(A[r * lda + k], LOAD(B[k * N + n]), acc);   \
      C[r * ldc + n] = acc;                                                                            \
    }                                                                                                  \
}

GEMM(float, from_f32)
GEMM(bf16, from_bf16)

#define EXPERTS(NAME, T, LOAD, STORE)                                                                 \
int NAME(const T* rows, int64_t H, const int64_t* counts, int64_t E, const T* gate_up, const T* down,  \
         int64_t I, int64_t limit, T* out, float* scratch) {                                           \
  float *x = scratch, *h = x + limit * H, *act = h + limit * 2 * I, *y = act + limit * I;              \
  int64_t start = 0;                                                                                   \
  for (int64_t e = 0; e < E; start += counts[e], e++) {                                                \
    int64_t n = counts[e];                                                                             \
    if (n == 0 || n > limit) continue;  /* larger groups: left alone */                                \
    for (int64_t j = 0; j < n * H; j++) x[j] = LOAD(rows[start * H + j]);                              \
    gemm_##T(n, x, H, gate_up + e * H * 2 * I, H, 2 * I, h, 2 * I);                                    \
    for (int64_t r = 0; r < n; r++) silu_mul(h + r * 2 * I, I, act + r * I);                           \
    gemm_##T(n, act, I, down + e * I * H, I, H, y, H);                                                 \
    for (int64_t j = 0; j < n * H; j++) out[start * H + j] = STORE(y[j]);                              \
  }                                                                                                    \
  return 0;                                                                                            \
}

EXPERTS(experts_f32, float, from_f32, to_f32)
EXPERTS(experts_bf16, bf16, from_bf16, to_bf16)
