/* Decode attention straight from the paged KV pool: one new token per sequence, no gathered copy.

   q    [*, heads, d]            the step's queries; decode i reads row rows[i]
   kp   [slots, kv_heads, d]     the layer's key pool (slot = block * block_size + offset)
   vp   [slots, kv_heads, dv]    its value pool
   tables [n, table_stride]      each decode's blocks, in order
   ctx_lens [n]                  keys each decode sees (its own included); a window keeps the last `window`
   out  [*, heads, dv]           written at rows[i]
   scores [group * max ctx]      scratch

   Query head h reads kv head h / group (GQA). Each decode is computed alone, in the same order
   whatever else is in the step, so its result does not depend on the batch. Scores, softmax and
   the weighted sum run in float32 (bfloat16 pools are widened on load). Returns 0, or -1 for
   shapes it does not take (the caller then uses its other path). */
#include <math.h>

#include "common.h"

#define MAXG 16
#define MAXD 256

#define BODY(NAME, T, LOAD, STORE)                                                                    \
static inline void NAME(const T* q, int64_t q_stride, const T* kp, const T* vp, const int64_t* tables,  \
    int64_t table_stride, const int64_t* ctx_lens, const int64_t* rows, int64_t n, int64_t group,       \
    int64_t kv_heads, int64_t d, int64_t dv, int64_t bs, float scale, int64_t window, T* out,           \
    int64_t out_stride, float* scores) {                                                                \
  int64_t kstride = kv_heads * d, vstride = kv_heads * dv;                                               \
  float qf[MAXG * MAXD], acc[MAXG * MAXD], m[MAXG], inv[MAXG];                                           \
  for (int64_t i = 0; i < n; i++) {                                                                      \
    int64_t ctx = ctx_lens[i], first = (window > 0 && ctx > window) ? ctx - window : 0, span = ctx - first; \
    const int64_t* tab = tables + i * table_stride;                                                      \
    for (int64_t kh = 0; kh < kv_heads; kh++) {                                                          \
      const T* qh = q + rows[i] * q_stride + kh * group * d;                                             \
      for (int64_t j = 0; j < group * d; j++) qf[j] = LOAD(qh[j]) * scale;                               \
      for (int64_t g = 0; g < group; g++) m[g] = -INFINITY;                                              \
      for (int64_t t = first; t < ctx;) {                                                                \
        int64_t blk = t / bs, stop = (blk + 1) * bs < ctx ? (blk + 1) * bs : ctx;                        \
        const T* kk = kp + (tab[blk] * bs + t % bs) * kstride + kh * d;                                  \
        for (; t < stop; t++, kk += kstride)                                                             \
          for (int64_t g = 0; g < group; g++) {                                                          \
            const float* qg = qf + g * d;                                                                \
            float s = 0.f;                                                                               \
            _Pragma("omp simd reduction(+:s)")                                                           \
            for (int64_t j = 0; j < d; j++) s += qg[j] * LOAD(kk[j]);                                    \
            scores[g * span + t - first] = s;                                                            \
            m[g] = s > m[g] ? s : m[g];                                                                  \
          }                                                                                              \
      }                                                                                                  \
      for (int64_t g = 0; g < group; g++) {                                                              \
        float *sg = scores + g * span, mg = m[g], sum = 0.f;                                             \
        _Pragma("omp simd reduction(+:sum)")                                                             \
        for (int64_t t = 0; t < span; t++) { float e = exp_nonpos(sg[t] - mg); sg[t] = e; sum += e; }    \
        inv[g] = 1.f / sum;                                                                              \
      }                                                                                                  \
      for (int64_t j = 0; j < group * dv; j++) acc[j] = 0.f;                                             \
      for (int64_t t = first; t < ctx;) {                                                                \
        int64_t blk = t / bs, stop = (blk + 1) * bs < ctx ? (blk + 1) * bs : ctx;                        \
        const T* vv = vp + (tab[blk] * bs + t % bs) * vstride + kh * dv;                                 \
        for (; t < stop; t++, vv += vstride)                                                             \
          for (int64_t g = 0; g < group; g++) {                                                          \
            float p = scores[g * span + t - first], *a = acc + g * dv;                                   \
            _Pragma("omp simd")                                                                          \
            for (int64_t j = 0; j < dv; j++) a[j] += p * LOAD(vv[j]);                                    \
          }                                                                                              \
      }                                                                                                  \
      T* o = out + rows[i] * out_stride + kh * group * dv;                                               \
      for (int64_t g = 0; g < group; g++)                                                                \
        for (int64_t j = 0; j < dv; j++) o[g * dv + j] = STORE(acc[g * dv + j] * inv[g]);                \
    }                                                                                                    \
  }                                                                                                      \
}

BODY(body_f32, float, from_f32, to_f32)
BODY(body_bf16, bf16, from_bf16, to_bf16)

/* Constant head sizes let the compiler unroll the inner loops: the common ones get their own copy. */
#define DISPATCH(BODYFN, T)                                                                              \
  if (group < 1 || group > MAXG || d > MAXD || dv > MAXD) return -1;                                     \
  if (d == 32 && dv == 32 && group == 2)                                                                 \
    BODYFN((const T*)q, q_stride, (const T*)kp, (const T*)vp, tables, table_stride, ctx_lens, rows, n, 2, kv_heads, 32, 32, bs, scale, window, (T*)out, out_stride, scores); \
  else if (d == 64 && dv == 64)                                                                          \
    BODYFN((const T*)q, q_stride, (const T*)kp, (const T*)vp, tables, table_stride, ctx_lens, rows, n, group, kv_heads, 64, 64, bs, scale, window, (T*)out, out_stride, scores); \
  else if (d == 128 && dv == 128)                                                                        \
    BODYFN((const T*)q, q_stride, (const T*)kp, (const T*)vp, tables, table_stride, ctx_lens, rows, n, group, kv_heads, 128, 128, bs, scale, window, (T*)out, out_stride, scores); \
  else                                                                                                   \
    BODYFN((const T*)q, q_stride, (const T*)kp, (const T*)vp, tables, table_stride, ctx_lens, rows, n, group, kv_heads, d, dv, bs, scale, window, (T*)out, out_stride, scores); \
  return 0;

#define SIGNATURE(NAME)                                                                                  \
int NAME(const void* q, int64_t q_stride, const void* kp, const void* vp, const int64_t* tables,         \
         int64_t table_stride, const int64_t* ctx_lens, const int64_t* rows, int64_t n, int64_t group,   \
         int64_t kv_heads, int64_t d, int64_t dv, int64_t bs, float scale, int64_t window, void* out,    \
         int64_t out_stride, float* scores)

SIGNATURE(decode_attention_f32) { DISPATCH(body_f32, float) }
SIGNATURE(decode_attention_bf16) { DISPATCH(body_bf16, bf16) }
