/* C[:M, :N] = A[:M, :K] @ B[:K, :N] for small M (a decode step's rows), float32 A and C, B float32
   or bfloat16 (widened on load), every element a chain of fused multiply-adds over k ascending.

   So an element's bits depend only on its row of A and its column of B: never on M, on the tile
   that held the row, or on the other rows of the call (batch invariance).

   Register tiles of R rows x V vectors of columns keep their R*V accumulators in registers: MAXACC
   of them (12 on AVX2's 16 registers, 24 on AVX-512's 32), as many independent chains as the FMA
   units' latency needs; a single row takes 8 vectors at once so its chains do not wait on each
   other. Columns run in panels whose weights (K x PANEL) stay in L2 while every row tile reads them;
   each tile prefetches B a few rows ahead (a decode step's experts come from L3 or memory). */
#ifndef RAYMOE_NATIVE_GEMM_H
#define RAYMOE_NATIVE_GEMM_H

#include "common.h"

#ifdef __AVX512F__
#define VB 64       /* bytes of a vector register */
#define MAXACC 24
#elif defined(__AVX__)
#define VB 32
#define MAXACC 12
#else               /* SSE: 16 registers of 16 bytes */
#define VB 16
#define MAXACC 12
#endif
#define VL (VB / 4) /* floats in a vector */
#define TILE 6      /* rows of a register tile */
#define PANEL 128   /* columns of a panel (a multiple of 8 * VL) */
#define PREFETCH 40 /* rows of B ahead that a tile asks the cache for (past B's end: harmless) */

typedef float vf __attribute__((vector_size(VB)));
typedef uint16_t vh __attribute__((vector_size(VB / 2)));
typedef uint32_t vu __attribute__((vector_size(VB)));

/* c + a * b in one rounding, spelled out: left to -ffp-contract, a tile of one vector came out as a
   multiply and an add, so a row's bits depended on its tile. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline vf vfma(vf a, vf b, vf c) { return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
static inline vf vset1(float a) { return (vf)_mm512_set1_ps(a); }
#elif defined(__FMA__)
#include <immintrin.h>
static inline vf vfma(vf a, vf b, vf c) { return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
static inline vf vset1(float a) { return (vf)_mm256_set1_ps(a); }
#else
static inline vf vfma(vf a, vf b, vf c) {
  for (int i = 0; i < VL; i++) c[i] = __builtin_fmaf(a[i], b[i], c[i]);
  return c;
}
static inline vf vset1(float a) {
  vf v;
  for (int i = 0; i < VL; i++) v[i] = a;
  return v;
}
#endif

static inline vf vload_float(const float* p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline vf vload_bf16(const bf16* p) {
  vh h; memcpy(&h, p, sizeof h);
  vu u = __builtin_convertvector(h, vu) << 16;
  vf f; memcpy(&f, &u, sizeof f); return f;
}

/* A register tile's body: R rows x V vectors of accumulators (R, V constants), each a chain of fused
   multiply-adds over k < K. Vector v of B's row k is at B_AT(k, v) (the cache asked for it PREFETCH
   rows ahead); row r's vector v goes to C + r * ldc + C_AT(v). */
#define TILE_BODY(R, V, LOADV, B_AT, C_AT)                                                             \
  vf acc[R][V];                                                                                        \
  _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                                  \
    _Pragma("GCC unroll 8") for (int v = 0; v < V; v++) acc[r][v] = (vf){0};                           \
  for (int64_t k = 0; k < K; k++) {                                                                    \
    vf b[V];                                                                                           \
    _Pragma("GCC unroll 8") for (int v = 0; v < V; v++) {                                              \
      if (v % (64 / VB) == 0) __builtin_prefetch(B_AT(k + PREFETCH, v));                               \
      b[v] = LOADV(B_AT(k, v));                                                                        \
      __asm__("" : "+x"(b[v])); /* in a register: not reloaded by each row's FMA */                    \
    }                                                                                                  \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                              \
      vf a = vset1(A[r * lda + k]);                                                                    \
      _Pragma("GCC unroll 8") for (int v = 0; v < V; v++) acc[r][v] = vfma(a, b[v], acc[r][v]);        \
    }                                                                                                  \
  }                                                                                                    \
  _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                                  \
    _Pragma("GCC unroll 8") for (int v = 0; v < V; v++) memcpy(C + r * ldc + C_AT(v), &acc[r][v], VB);

/* C[r, n0 : n0 + V*VL] for r < R, B [K, N] row-major. */
#define ROWMAJOR_B(k, v) (B + (k) * N + n0 + (v) * VL)
#define ROWMAJOR_C(v) (n0 + (v) * VL)
#define TILE_KERNEL(T, R, V)                                                                           \
static inline void tile_##T##_##R##_##V(const float* A, int64_t lda, const T* B, int64_t K, int64_t N, \
                                        int64_t n0, float* C, int64_t ldc) {                           \
  TILE_BODY(R, V, vload_##T, ROWMAJOR_B, ROWMAJOR_C)                                                   \
}

/* The columns [n0, n1) of R rows: the widest tiles first (8, 4, 2, 1 vectors, within MAXACC), then
   the last columns (fewer than VL) one element at a time, with the same chain. */
#define ROW_TILE(T, LOAD, R)                                                                           \
TILE_KERNEL(T, R, 8) TILE_KERNEL(T, R, 4) TILE_KERNEL(T, R, 2) TILE_KERNEL(T, R, 1)                    \
static inline void rows_##T##_##R(const float* A, int64_t lda, const T* B, int64_t K, int64_t N,       \
                                  int64_t n0, int64_t n1, float* C, int64_t ldc) {                     \
  if (R * 8 <= MAXACC) for (; n0 + 8 * VL <= n1; n0 += 8 * VL) tile_##T##_##R##_8(A, lda, B, K, N, n0, C, ldc); \
  if (R * 4 <= MAXACC) for (; n0 + 4 * VL <= n1; n0 += 4 * VL) tile_##T##_##R##_4(A, lda, B, K, N, n0, C, ldc); \
  if (R * 2 <= MAXACC) for (; n0 + 2 * VL <= n1; n0 += 2 * VL) tile_##T##_##R##_2(A, lda, B, K, N, n0, C, ldc); \
  for (; n0 + VL <= n1; n0 += VL) tile_##T##_##R##_1(A, lda, B, K, N, n0, C, ldc);                    \
  for (int r = 0; r < R; r++)                                                                          \
    for (int64_t n = n0; n < n1; n++) {                                                                \
      float acc = 0.f;                                                                                 \
      for (int64_t k = 0; k < K; k++) acc = __builtin_fmaf(A[r * lda + k], LOAD(B[k * N + n]), acc);   \
      C[r * ldc + n] = acc;                                                                            \
    }                                                                                                  \
}

#define GEMM(T, LOAD)                                                                                  \
ROW_TILE(T, LOAD, 1) ROW_TILE(T, LOAD, 2) ROW_TILE(T, LOAD, 3)                                         \
ROW_TILE(T, LOAD, 4) ROW_TILE(T, LOAD, 5) ROW_TILE(T, LOAD, 6)                                         \
static inline void gemm_##T(int64_t M, const float* A, int64_t lda, const T* B, int64_t K, int64_t N,  \
                            float* C, int64_t ldc) {                                                   \
  for (int64_t p0 = 0; p0 < N; p0 += PANEL) {                                                          \
    int64_t p1 = p0 + PANEL < N ? p0 + PANEL : N;                                                      \
    for (int64_t r0 = 0; r0 < M; r0 += TILE) {                                                         \
      const float* a = A + r0 * lda;                                                                   \
      float* c = C + r0 * ldc;                                                                         \
      switch (M - r0 < TILE ? M - r0 : TILE) {                                                         \
        case 1: rows_##T##_1(a, lda, B, K, N, p0, p1, c, ldc); break;                                  \
        case 2: rows_##T##_2(a, lda, B, K, N, p0, p1, c, ldc); break;                                  \
        case 3: rows_##T##_3(a, lda, B, K, N, p0, p1, c, ldc); break;                                  \
        case 4: rows_##T##_4(a, lda, B, K, N, p0, p1, c, ldc); break;                                  \
        case 5: rows_##T##_5(a, lda, B, K, N, p0, p1, c, ldc); break;                                  \
        default: rows_##T##_6(a, lda, B, K, N, p0, p1, c, ldc);                                        \
      }                                                                                                \
    }                                                                                                  \
  }                                                                                                    \
}

GEMM(float, from_f32)
GEMM(bf16, from_bf16)

/* Packed float32 B for gemm_strips: strips of STRIP output columns (a 6-row tile's width), each its
   [K, width] block row-major, one after the other (the last strip may be narrower). A strip is
   K * STRIP * 4 contiguous bytes (8 KB at K = 128 on AVX2): it stays in L1 while every row tile
   reads it, and streams in order from memory. */
#define SV (MAXACC / TILE)                                      /* vectors of a 6-row tile */
#define STRIP (SV * VL)                                         /* columns of a strip */
#define GROUP(R) (MAXACC / ((R) * SV) < 8 / SV ? (MAXACC / ((R) * SV) > 0 ? MAXACC / ((R) * SV) : 1) : 8 / SV)

/* C[r, :G * STRIP] for r < R, from G consecutive full strips at B: V = G * SV accumulators a row. */
#define STRIPS_B(k, v) (B + ((v) / SV) * K * STRIP + (k) * STRIP + ((v) % SV) * VL)
#define STRIPS_C(v) (((v) / SV) * STRIP + ((v) % SV) * VL)
#define STRIP_KERNEL(R, G, NAME)                                                                       \
static inline void NAME(const float* A, int64_t lda, const float* B, int64_t K, float* C, int64_t ldc) { \
  enum { V = (G) * SV };                                                                               \
  TILE_BODY(R, V, vload_float, STRIPS_B, STRIPS_C)                                                     \
}                                                                                                      \
/* R rows over the full strips [s0, s1) (columns), G strips at a time while they last, then one. */    \
static inline void NAME##_rows(const float* A, int64_t lda, const float* B, int64_t K, int64_t s0,      \
                               int64_t s1, float* C, int64_t ldc) {                                    \
  for (; s0 + (G) * STRIP <= s1; s0 += (G) * STRIP) NAME(A, lda, B + s0 * K, K, C + s0, ldc);          \
  for (; s0 < s1; s0 += STRIP) strip1_##R(A, lda, B + s0 * K, K, C + s0, ldc);                        \
}

#define STRIP_TILES(R) STRIP_KERNEL(R, 1, strip1_##R) STRIP_KERNEL(R, GROUP(R), stripg_##R)
STRIP_TILES(1) STRIP_TILES(2) STRIP_TILES(3) STRIP_TILES(4) STRIP_TILES(5) STRIP_TILES(6)

/* Rows of the next row tile when `left` rows remain: 6, but 7-9 split into two tiles of 3-5 (a tile
   of 1 or 2 rows has too few accumulators to keep the FMA units busy). */
static inline int64_t strip_tile_rows(int64_t left) { return left <= 6 ? left : left <= 9 ? (left + 1) / 2 : 6; }

#define STRIP_CASE(R, FN, ...) case R: FN##_##R##_rows(__VA_ARGS__); break;
#define STRIP_SWITCH(FN, R, ...)                                                                       \
  switch (R) {                                                                                         \
    STRIP_CASE(1, FN, __VA_ARGS__) STRIP_CASE(2, FN, __VA_ARGS__) STRIP_CASE(3, FN, __VA_ARGS__)       \
    STRIP_CASE(4, FN, __VA_ARGS__) STRIP_CASE(5, FN, __VA_ARGS__) default: FN##_6_rows(__VA_ARGS__);   \
  }

/* C[:M, :N] = A[:M, :K] @ B, B packed in strips (above): each element the same fused multiply-add
   chain over k ascending as gemm_float gives it. Up to 6 rows: one row tile over G strips at a time
   (enough accumulators for a row or two). More: strip after strip, every row tile of the strip
   while it is in L1. The last, narrower strip through gemm_float's tiles. */
static inline void gemm_strips(int64_t M, const float* A, int64_t lda, const float* B, int64_t K, int64_t N,
                               float* C, int64_t ldc) {
  int64_t full = N / STRIP * STRIP;
  if (M <= TILE) {
    STRIP_SWITCH(stripg, M, A, lda, B, K, 0, full, C, ldc)
  } else {
    for (int64_t s0 = 0; s0 < full; s0 += STRIP)
      for (int64_t r0 = 0, R; r0 < M; r0 += R) {
        R = strip_tile_rows(M - r0);
        STRIP_SWITCH(strip1, R, A + r0 * lda, lda, B, K, s0, s0 + STRIP, C + r0 * ldc, ldc)
      }
  }
  if (full < N) gemm_float(M, A, lda, B + full * K, K, N - full, C + full, ldc);
}

#endif
