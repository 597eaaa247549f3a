/* One MoE layer's expert FFNs (SwiGLU) on rows already sorted by expert, in one call.

   rows     [P, H]          contiguous groups: counts[e] rows for held expert e, in stack order
   gate_up  [E, H, 2I]      each expert's gate and up projections, transposed (rows @ gate_up[e])
   down     [E, I, H]       its down projection, transposed
                            (the _strips kernels: each expert's two packed by strips, `gemm.h`)
   out      [P, H]          silu(rows @ gate) * (rows @ up) @ down, row by row
   scratch  [chunk * (2H + 3I)] float32 work space: groups run `chunk` rows at a time

   The matmuls are `gemm.h`'s: every output element is a chain of fused multiply-adds over k in
   ascending order, whatever the tile, so a row's result does not depend on the other rows of the
   call. Math in float32; bfloat16 operands are widened on load and
   the result rounded once (to nearest even). Returns 0. */
#include <math.h>

#include "gemm.h"

/* Columns of a strip of a packed weight (gemm.h's STRIP: 16 with AVX2, 64 with AVX-512). */
int64_t strip_columns(void) { return STRIP; }

/* act[i] = silu(gate[i]) * up[i] for gate = h[:I], up = h[I:2I]; sigmoid from exp(-|g|) <= 1. */
__attribute__((noinline)) static void silu_mul(const float* restrict h, int64_t I, float* restrict act) {
#pragma omp simd
  for (int64_t i = 0; i < I; i++) {
    float g = h[i], e = exp_nonpos(-fabsf(g)), sig = (g < 0.f ? e : 1.f) / (1.f + e);  /* no branch: vectorised */
    act[i] = g * sig * h[I + i];
  }
}

#define EXPERTS(NAME, T, LOAD, STORE, GEMM)                                                           \
int NAME(const T* rows, int64_t H, const int64_t* counts, int64_t E, const T* gate_up, const T* down,  \
         int64_t I, int64_t chunk, T* out, float* scratch) {                                           \
  float *x = scratch, *h = x + chunk * H, *act = h + chunk * 2 * I, *y = act + chunk * I;              \
  for (int64_t e = 0, start = 0; e < E; start += counts[e], e++)                                       \
    for (int64_t r0 = start; r0 < start + counts[e]; r0 += chunk) {                                    \
      int64_t n = start + counts[e] - r0 < chunk ? start + counts[e] - r0 : chunk;                     \
      for (int64_t j = 0; j < n * H; j++) x[j] = LOAD(rows[r0 * H + j]);                               \
      GEMM(n, x, H, gate_up + e * H * 2 * I, H, 2 * I, h, 2 * I);                                      \
      for (int64_t r = 0; r < n; r++) silu_mul(h + r * 2 * I, I, act + r * I);                         \
      GEMM(n, act, I, down + e * I * H, I, H, y, H);                                                   \
      for (int64_t j = 0; j < n * H; j++) out[r0 * H + j] = STORE(y[j]);                               \
    }                                                                                                  \
  return 0;                                                                                            \
}

EXPERTS(experts_f32, float, from_f32, to_f32, gemm_float)
EXPERTS(experts_bf16, bf16, from_bf16, to_bf16, gemm_bf16)
EXPERTS(experts_f32_strips, float, from_f32, to_f32, gemm_strips)

/* A whole MoE layer's routed experts from the router's choice, in one call: what
   `raymoe.model.experts.group_tokens`, `ExpertStore.run_groups` and `combine` do together.

   x        [Tn, H]         the layer's input rows
   ids      [Tn, K] int64   each token's experts (0 <= id < E); w [Tn, K] their weights
   out      [Tn, H]         sum over k of w[t, k] * expert_ids[t, k](x[t])
   order    [E + 1 + Tn K] int64 scratch; scratch as EXPERTS'

   Rows are grouped by expert, stably (a token's rows in token order, as a stable argsort of the
   flattened ids). Each expert output is rounded to T, multiplied by its weight (rounded to T) and
   added to the token's sum in expert order, from zero, each step rounded to T: the operations and
   order of torch's `combine` (`rows * w`, then `index_add_`), kept apart (no fused multiply-add),
   so the sum has combine's bits. Returns 0, or -1 for an id out of range (nothing written). */
#define MOE(NAME, T, LOAD, STORE, GEMM)                                                               \
int NAME(const T* x, int64_t Tn, int64_t H, const int64_t* ids, const T* w, int64_t K, int64_t E,      \
         const T* gate_up, const T* down, int64_t I, int64_t chunk, T* out, float* scratch,            \
         int64_t* order) {                                                                             \
  int64_t *start = order, *rows = order + E + 1, P = Tn * K;                                           \
  for (int64_t e = 0; e <= E; e++) start[e] = 0;                                                       \
  for (int64_t r = 0; r < P; r++) {                                                                    \
    if (ids[r] < 0 || ids[r] >= E) return -1;                                                          \
    start[ids[r] + 1]++;                                                                               \
  }                                                                                                    \
  for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];                                            \
  for (int64_t r = 0; r < P; r++) rows[start[ids[r]]++] = r; /* start[e] now ends group e */          \
  for (int64_t j = 0; j < Tn * H; j++) out[j] = STORE(0.f);                                            \
  float *xs = scratch, *h = xs + chunk * H, *act = h + chunk * 2 * I, *y = act + chunk * I;            \
  for (int64_t e = 0, begin = 0; e < E; begin = start[e], e++)                                         \
    for (int64_t r0 = begin; r0 < start[e]; r0 += chunk) {                                             \
      int64_t n = start[e] - r0 < chunk ? start[e] - r0 : chunk;                                       \
      for (int64_t j = 0; j < n; j++)                                                                  \
        for (int64_t c = 0; c < H; c++) xs[j * H + c] = LOAD(x[rows[r0 + j] / K * H + c]);             \
      GEMM(n, xs, H, gate_up + e * H * 2 * I, H, 2 * I, h, 2 * I);                                     \
      for (int64_t j = 0; j < n; j++) silu_mul(h + j * 2 * I, I, act + j * I);                         \
      GEMM(n, act, I, down + e * I * H, I, H, y, H);                                                   \
      for (int64_t j = 0; j < n; j++) {                                                                \
        T* o = out + rows[r0 + j] / K * H;                                                             \
        float wr = LOAD(w[rows[r0 + j]]);                                                              \
        for (int64_t c = 0; c < H; c++) {                                                              \
          float p = LOAD(STORE(LOAD(STORE(y[j * H + c])) * wr));                                       \
          __asm__("" : "+x"(p)); /* rounded apart: never fused into the add */                          \
          o[c] = STORE(LOAD(o[c]) + p);                                                                \
        }                                                                                              \
      }                                                                                                \
    }                                                                                                  \
  return 0;                                                                                            \
}

MOE(moe_f32, float, from_f32, to_f32, gemm_float)
MOE(moe_bf16, bf16, from_bf16, to_bf16, gemm_bf16)
MOE(moe_f32_strips, float, from_f32, to_f32, gemm_strips)
