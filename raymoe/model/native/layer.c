/* A decoder layer's pieces in float32, and a decode step's layer in two calls built from them.

   Built as one unit with the other kernels (their sources are included), so each piece here is the
   same code the separate calls run, and gives the same bits:
   - linear_f32: rows @ a weight packed by strips (`gemm.h`'s gemm_strips: each output a fused
     multiply-add chain over k ascending, whatever the other rows), plus a bias. raymoe's `Linear`
     uses it for every row count where the weight is small, so a token's projection never depends on
     its step. Packed: for each strip of STRIP output columns (a row tile's width), its [K, width]
     block row-major: a tile reads it contiguously, and it stays in L1 while every row tile of the
     step reads it (a plain [K, N] transpose put a tile's column in a few L1 sets).
   - route_f32: a softmax router's choice (softmax over the experts in float32, the top k, their
     weights renormalised if asked).
   - attention_block_f32: RMSNorm, the fused q/k/v projection, the per-head q/k norm, rotary
     embedding (x * cos + roll(x) * signed sin, each product and the sum rounded as torch's three
     ops round them), the step's keys and values into the paged pool, decode attention
     (`decode_attention.c`), the output projection, the residual add and the post-attention norm.
   - moe_block_f32: the router, the routed experts (`experts.c`'s moe_f32) and the residual add.
   The blocks take decode steps (one new token per sequence); raymoe's torch path runs every other
   step with the same pieces. Shapes are in each function's comment. Return 0, or -1 for shapes a
   piece does not take (checked before anything is written). */
#include "decode_attention.c"
#include "experts.c"
#include "norm.c"

/* out [M, N] = x [M, K] @ w (packed by strips) (+ bias [N]). */
int linear_f32(const float* x, int64_t M, int64_t K, const float* w, int64_t N, const float* bias, float* out) {
  gemm_strips(M, x, K, w, K, N, out, N);
  if (bias)
    for (int64_t m = 0; m < M; m++)
      for (int64_t n = 0; n < N; n++) out[m * N + n] += bias[n];
  return 0;
}

/* x [T, H] @ gate [H, E] (packed by strips) -> softmax -> ids [T, K], weights [T, K] (each token's K largest, largest
   first, ties to the lower id; divided by their sum if normalize). scratch [E] floats. */
int route_f32(const float* x, int64_t T, int64_t H, const float* gate, int64_t E, int64_t K, int64_t normalize,
              int64_t* ids, float* weights, float* scratch) {
  if (K < 1 || K > E) return -1;
  for (int64_t t = 0; t < T; t++) {
    float* p = scratch;
    gemm_strips(1, x + t * H, H, gate, H, E, p, E);
    float m = p[0], sum = 0.f;
    for (int64_t e = 1; e < E; e++) m = p[e] > m ? p[e] : m;
    for (int64_t e = 0; e < E; e++) sum += (p[e] = expf(p[e] - m));
    for (int64_t e = 0; e < E; e++) p[e] /= sum;
    int64_t* id = ids + t * K;
    float *w = weights + t * K, total = 0.f;
    for (int64_t k = 0; k < K; k++) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; e++) {
        int taken = 0;
        for (int64_t j = 0; j < k; j++) taken |= id[j] == e;
        if (!taken && (best < 0 || p[e] > p[best])) best = e;
      }
      id[k] = best, w[k] = p[best], total += p[best];
    }
    if (normalize)
      for (int64_t k = 0; k < K; k++) w[k] /= total;
  }
  return 0;
}

/* qk [T, heads, d] in place: x * cos + roll(x, d / 2) * ssin, cos and ssin [T, d] (ssin: sin with its
   first half negated); the products rounded apart, as torch's separate ops round them. */
static void rope_f32(float* qk, int64_t T, int64_t heads, int64_t d, const float* cos, const float* ssin) {
  int64_t half = d / 2;
  for (int64_t t = 0; t < T; t++)
    for (int64_t h = 0; h < heads; h++) {
      float* x = qk + (t * heads + h) * d;
      const float *c = cos + t * d, *s = ssin + t * d;
      if (half % VL == 0) { /* whole vectors: both halves at once, the products kept apart */
        for (int64_t j = 0; j < half; j += VL) {
          vf lo = vload_float(x + j), hi = vload_float(x + half + j);
          vf a0 = lo * vload_float(c + j), b0 = hi * vload_float(s + j);
          vf a1 = hi * vload_float(c + half + j), b1 = lo * vload_float(s + half + j);
          __asm__("" : "+x"(a0), "+x"(b0), "+x"(a1), "+x"(b1)); /* never fused into the adds */
          vf r0 = a0 + b0, r1 = a1 + b1;
          memcpy(x + j, &r0, VB), memcpy(x + half + j, &r1, VB);
        }
        continue;
      }
      float tmp[MAXD];
      for (int64_t j = 0; j < d; j++) {
        float a = x[j] * c[j], b = x[(j + half) % d] * s[j];
        __asm__("" : "+x"(a), "+x"(b));
        tmp[j] = a + b;
      }
      memcpy(x, tmp, d * sizeof(float));
    }
}

/* The attention half of a decode step's layer.
   h [T, H] residual stream; w_in, w_post [H] the norms' weights; qkv [H, Q] (packed) with Q = (heads
   + 2 kv_heads) d and qkv_bias [Q] or NULL; qk_w [heads + kv_heads, d] per-head q/k norm weights or NULL;
   cos, ssin [T, d]; kp, vp [slots, kv_heads, d] the layer's pools, slots [T] where each token's key
   and value go; tables / ctx_lens / rows / n as decode_attention_f32 takes them; o [heads d, H] (packed).
   Writes h_out = h + attention [T, H] and x_out = post norm of h_out [T, H].
   scratch: T (H + Q + (heads + kv_heads) d + heads d) + (group + 3) max_ctx + 1 floats. */
int attention_block_f32(const float* h, int64_t T, int64_t H, const float* w_in, float eps, const float* qkv_w,
                        const float* qkv_bias, int64_t heads, int64_t kv_heads, int64_t d, const float* qk_w,
                        float qk_eps, const float* cos, const float* ssin, float* kp, float* vp, const int64_t* slots,
                        const int64_t* tables, int64_t table_stride, const int64_t* ctx_lens, const int64_t* rows,
                        int64_t n, int64_t bs, float scale, int64_t window, const float* o_w, const float* w_post,
                        float* h_out, float* x_out, float* scratch) {
  int64_t group = heads / kv_heads, nqk = heads + kv_heads, Q = (nqk + kv_heads) * d;
  if (group < 1 || group > MAXG || d > MAXD || d % 2) return -1;
  float *xn = scratch, *qkv = xn + T * H, *qk = qkv + T * Q, *att = qk + T * nqk * d, *scores = att + T * heads * d;
  scores += (uintptr_t)scores % 8 ? 1 : 0; /* the kernel keeps int64 slots there */
  rms_norm_f32(h, T, 1, H, H, w_in, 0, eps, xn);
  linear_f32(xn, T, H, qkv_w, Q, qkv_bias, qkv);
  if (qk_w) {
    rms_norm_f32(qkv, T, nqk, d, Q, qk_w, d, qk_eps, qk);
  } else {
    for (int64_t t = 0; t < T; t++) memcpy(qk + t * nqk * d, qkv + t * Q, nqk * d * sizeof(float));
  }
  rope_f32(qk, T, nqk, d, cos, ssin);
  for (int64_t t = 0; t < T; t++) {
    memcpy(kp + slots[t] * kv_heads * d, qk + (t * nqk + heads) * d, kv_heads * d * sizeof(float));
    memcpy(vp + slots[t] * kv_heads * d, qkv + t * Q + nqk * d, kv_heads * d * sizeof(float));
  }
  decode_attention_f32(qk, nqk * d, kp, vp, tables, table_stride, ctx_lens, rows, n, group, kv_heads, d, d, bs,
                       scale, window, att, heads * d, scores);
  linear_f32(att, T, heads * d, o_w, H, NULL, h_out);
  for (int64_t j = 0; j < T * H; j++) h_out[j] = h[j] + h_out[j];
  rms_norm_f32(h_out, T, 1, H, H, w_post, 0, eps, x_out);
  return 0;
}

/* The MoE half: h_out [T, H] = h + routed experts of x [T, H] (the post-attention norm), routed by
   route_f32 over gate [H, E] (packed; ids [T, K] and weights [T, K] written too) through experts gate_up
   [E, H, 2I], down [E, I, H] (each expert's packed by strips where strips is 1). scratch: moe_f32's, at least E floats; order: moe_f32's. */
int moe_block_f32(const float* x, const float* h, int64_t T, int64_t H, const float* gate, int64_t E, int64_t K,
                  int64_t normalize, const float* gate_up, const float* down, int64_t strips, int64_t I, int64_t chunk,
                  float* h_out, int64_t* ids, float* weights, float* scratch, int64_t* order) {
  if (route_f32(x, T, H, gate, E, K, normalize, ids, weights, scratch)) return -1;
  if ((strips ? moe_f32_strips : moe_f32)(x, T, H, ids, weights, K, E, gate_up, down, I, chunk, h_out, scratch, order))
    return -1;
  for (int64_t j = 0; j < T * H; j++) h_out[j] = h[j] + h_out[j];
  return 0;
}

/* One decoder layer as decode_step_f32 reads it: the weights attention_block_f32 and moe_block_f32
   take, its paged pools and its sizes. */
typedef struct {
  const float *w_in, *qkv_w, *qkv_bias, *qk_w, *o_w, *w_post, *gate, *gate_up, *down;
  float *kp, *vp;
  int64_t heads, kv_heads, d, window, experts, top_k, normalize, strips, inter;
  float eps, qk_eps, scale;
} decode_layer;

/* A decode step in one call: out [T, H] = the final norm (weight norm_w [H], eps norm_eps) of the
   layers' output on embed [vocab, H] at input_ids [T]. Layer after layer: attention_block_f32 (into
   a, x [T, H]) then moe_block_f32 (back into h [T, H]), so each layer has the bits of its two calls.
   Each token's rotary rows come from the tables cos_t, ssin_t [table_len, d] at positions [T]
   (gathered into cs [2, T, d]). The routing of layer l goes to ids [layers, T, K] and weights
   [layers, T, K] (K: the layers' top_k). scratch: the larger of the blocks' scratch over the layers;
   order: moe_f32's. Returns -1 before anything is written for an id, position or layer shape it
   does not take. */
int decode_step_f32(const decode_layer* L, int64_t layers, const float* embed, int64_t vocab, const int64_t* input_ids,
                    int64_t T, int64_t H, const float* cos_t, const float* ssin_t, int64_t table_len, int64_t d,
                    const int64_t* positions, const int64_t* slots, const int64_t* tables, int64_t table_stride,
                    const int64_t* ctx_lens, const int64_t* rows, int64_t n, int64_t bs, int64_t chunk,
                    const float* norm_w, float norm_eps, float* out, float* h, float* a, float* x, float* cs,
                    float* scratch, int64_t* order, int64_t* ids, float* weights, int64_t K) {
  for (int64_t l = 0; l < layers; l++) {
    int64_t group = L[l].kv_heads > 0 ? L[l].heads / L[l].kv_heads : 0;
    if (group < 1 || group > MAXG || L[l].d != d || d > MAXD || d % 2 || L[l].top_k != K || K > L[l].experts)
      return -1;
  }
  for (int64_t t = 0; t < T; t++)
    if (input_ids[t] < 0 || input_ids[t] >= vocab || positions[t] < 0 || positions[t] >= table_len) return -1;
  float *cos = cs, *ssin = cs + T * d;
  for (int64_t t = 0; t < T; t++) {
    memcpy(h + t * H, embed + input_ids[t] * H, H * sizeof(float));
    memcpy(cos + t * d, cos_t + positions[t] * d, d * sizeof(float));
    memcpy(ssin + t * d, ssin_t + positions[t] * d, d * sizeof(float));
  }
  for (int64_t l = 0; l < layers; l++) {
    const decode_layer* y = L + l;
    attention_block_f32(h, T, H, y->w_in, y->eps, y->qkv_w, y->qkv_bias, y->heads, y->kv_heads, d, y->qk_w,
                        y->qk_eps, cos, ssin, y->kp, y->vp, slots, tables, table_stride, ctx_lens, rows, n, bs,
                        y->scale, y->window, y->o_w, y->w_post, a, x, scratch);
    if (moe_block_f32(x, a, T, H, y->gate, y->experts, K, y->normalize, y->gate_up, y->down, y->strips, y->inter, chunk, h,
                      ids + l * T * K, weights + l * T * K, scratch, order))
      return -1;
  }
  rms_norm_f32(h, T, 1, H, H, norm_w, 0, norm_eps, out);
  return 0;
}
