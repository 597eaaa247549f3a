/* Decode attention straight from the paged KV pool: one new token per sequence, no gathered copy.

   q    [*, heads, d]            the step's queries; decode i reads row rows[i]
   kp   [slots, kv_heads, d]     the layer's key pool (slot = block * block_size + offset)
   vp   [slots, kv_heads, dv]    its value pool
   tables [n, table_stride]      each decode's blocks, in order
   ctx_lens [n]                  keys each decode sees (its own included); a window keeps the last `window`
   out  [*, heads, dv]           written at rows[i]
   scores [(group + 3) * max ctx] scratch (scores, and each position's slot)

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

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* With AVX2 and FMA (d and dv multiples of 8): the scores eight positions at a time, each a vector
   of partial products summed by a fixed tree of horizontal adds, and the weighted sum of values in
   vectors, two interleaved sets of accumulators per 32 dims. Same math, another fixed summation
   order; still each decode alone. */
#define HAS_FAST 1

static inline __m256 load8_f32(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8_bf16(const bf16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

/* [sum(v[0]), ..., sum(v[7])]: the eight vectors' lanes summed, one tree for all. */
static inline __m256 sum8(const __m256* v) {
  __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

#define FAST(NAME, T, LOAD8, LOAD, STORE)                                                              \
static void NAME(const T* q, int64_t q_stride, const T* kp, const T* vp, const int64_t* tables,         \
    int64_t table_stride, const int64_t* ctx_lens, const int64_t* rows, int64_t n, int64_t group,       \
    int64_t kv_heads, int64_t d, int64_t dv, int64_t bs, float scale, int64_t window, T* out,           \
    int64_t out_stride, float* scores) {                                                                \
  int64_t kstride = kv_heads * d, vstride = kv_heads * dv, nd = d / 8;                                   \
  float qf[MAXG * MAXD] __attribute__((aligned(32))), inv[MAXG];                                        \
  const T* kr[8];                                                                                        \
  for (int64_t i = 0; i < n; i++) {                                                                      \
    int64_t ctx = ctx_lens[i], first = (window > 0 && ctx > window) ? ctx - window : 0, span = ctx - first; \
    const int64_t* tab = tables + i * table_stride;                                                      \
    int64_t* slot = (int64_t*)(scores + group * span + (group * span) % 2); /* each position's slot */  \
    for (int64_t t = first, at = 0; t < ctx;) {                                                          \
      int64_t blk = t / bs, stop = (blk + 1) * bs < ctx ? (blk + 1) * bs : ctx;                          \
      for (int64_t s0 = tab[blk] * bs + t % bs; t < stop; t++) slot[at++] = s0++;                        \
    }                                                                                                    \
    for (int64_t kh = 0; kh < kv_heads; kh++) {                                                          \
      const T* qh = q + rows[i] * q_stride + kh * group * d;                                             \
      for (int64_t j = 0; j < group * d; j++) qf[j] = LOAD(qh[j]) * scale;                               \
      for (int64_t g = 0; g < group; g++) {                                                              \
        const float* qg = qf + g * d;                                                                    \
        float* sg = scores + g * span;                                                                   \
        for (int64_t t0 = 0; t0 < span; t0 += 8) {                                                      \
          int64_t m = span - t0 < 8 ? span - t0 : 8;                                                     \
          __m256 acc[8];                                                                                 \
          for (int64_t u = 0; u < 8; u++) {                                                              \
            kr[u] = kp + slot[t0 + (u < m ? u : 0)] * kstride + kh * d;                                  \
            acc[u] = _mm256_setzero_ps();                                                                \
          }                                                                                              \
          for (int64_t c = 0; c < nd; c++) {                                                             \
            __m256 qc = _mm256_load_ps(qg + c * 8);                                                      \
            for (int u = 0; u < 8; u++) acc[u] = _mm256_fmadd_ps(qc, LOAD8(kr[u] + c * 8), acc[u]);      \
          }                                                                                              \
          if (m == 8) {                                                                                  \
            _mm256_storeu_ps(sg + t0, sum8(acc));                                                        \
          } else {                                                                                       \
            float sums[8];                                                                               \
            _mm256_storeu_ps(sums, sum8(acc));                                                           \
            for (int64_t u = 0; u < m; u++) sg[t0 + u] = sums[u];                                        \
          }                                                                                              \
        }                                                                                                \
        float mg = -INFINITY, sum = 0.f;                                                                 \
        _Pragma("omp simd reduction(max:mg)")                                                            \
        for (int64_t t = 0; t < span; t++) mg = sg[t] > mg ? sg[t] : mg;                                 \
        _Pragma("omp simd reduction(+:sum)")                                                             \
        for (int64_t t = 0; t < span; t++) { float e = exp_nonpos(sg[t] - mg); sg[t] = e; sum += e; }    \
        inv[g] = 1.f / sum;                                                                              \
      }                                                                                                  \
      T* o = out + rows[i] * out_stride + kh * group * dv;                                               \
      for (int64_t g = 0; g < group; g++)                                                                \
        for (int64_t c0 = 0; c0 < dv; c0 += 32) {                                                        \
          int64_t w = dv - c0 < 32 ? (dv - c0) / 8 : 4;                                                  \
          __m256 a0[4] = {0}, a1[4] = {0};                                                               \
          const float* sg = scores + g * span;                                                           \
          int64_t t = 0;                                                                                 \
          for (; t + 1 < span; t += 2) {                                                                 \
            const T* v1 = vp + slot[t] * vstride + kh * dv + c0;                                         \
            const T* v2 = vp + slot[t + 1] * vstride + kh * dv + c0;                                     \
            __m256 p1 = _mm256_set1_ps(sg[t]), p2 = _mm256_set1_ps(sg[t + 1]);                          \
            for (int c = 0; c < w; c++) {                                                                \
              a0[c] = _mm256_fmadd_ps(p1, LOAD8(v1 + c * 8), a0[c]);                                     \
              a1[c] = _mm256_fmadd_ps(p2, LOAD8(v2 + c * 8), a1[c]);                                     \
            }                                                                                            \
          }                                                                                              \
          if (t < span) {                                                                                \
            const T* v1 = vp + slot[t] * vstride + kh * dv + c0;                                         \
            __m256 p1 = _mm256_set1_ps(sg[t]);                                                           \
            for (int c = 0; c < w; c++) a0[c] = _mm256_fmadd_ps(p1, LOAD8(v1 + c * 8), a0[c]);           \
          }                                                                                              \
          __m256 sc = _mm256_set1_ps(inv[g]);                                                            \
          for (int c = 0; c < w; c++) {                                                                  \
            float r[8];                                                                                  \
            _mm256_storeu_ps(r, _mm256_mul_ps(_mm256_add_ps(a0[c], a1[c]), sc));                         \
            for (int j = 0; j < 8; j++) o[g * dv + c0 + c * 8 + j] = STORE(r[j]);                        \
          }                                                                                              \
        }                                                                                                \
    }                                                                                                    \
  }                                                                                                      \
}

FAST(fast_f32, float, load8_f32, from_f32, to_f32)
FAST(fast_bf16, bf16, load8_bf16, from_bf16, to_bf16)
#define FAST_OK (d % 8 == 0 && dv % 8 == 0)
#else
#define HAS_FAST 0
#define FAST_OK 0
#define fast_f32 body_f32
#define fast_bf16 body_bf16
#endif

/* Constant head sizes let the compiler unroll the inner loops: the common ones get their own copy. */
#define DISPATCH(BODYFN, FASTFN, T)                                                                      \
  if (group < 1 || group > MAXG || d > MAXD || dv > MAXD) return -1;                                     \
  if (FAST_OK) {                                                                                         \
    if (d == 32 && dv == 32)                                                                             \
      FASTFN((const T*)q, q_stride, (const T*)kp, (const T*)vp, tables, table_stride, ctx_lens, rows, n, group, kv_heads, 32, 32, bs, scale, window, (T*)out, out_stride, scores); \
    else                                                                                                 \
      FASTFN((const T*)q, q_stride, (const T*)kp, (const T*)vp, tables, table_stride, ctx_lens, rows, n, group, kv_heads, d, dv, bs, scale, window, (T*)out, out_stride, scores); \
    return 0;                                                                                            \
  }                                                                                                      \
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

SIGNATURE(decode_attention_f32) { DISPATCH(body_f32, fast_f32, float) }
SIGNATURE(decode_attention_bf16) { DISPATCH(body_bf16, fast_bf16, bf16) }
