/* Attention of one query per (image, head) against all T tokens, forward and backward: the CLS token's attention in
 * a ViT's last block under CLS pooling, where nothing reads the other tokens' outputs (models/vit.py).
 *
 * PyTorch computes it from views of the key-value projection's output as batched matmuls of single rows or broadcast
 * products, and their copies into head-major layouts took as long as the whole attention kernel for every token
 * (docs/performance.md). Here each (image, head) reads its query, keys and values where they are and writes its
 * output and gradients straight into their places. Sums of products of bf16 numbers in fp32, the softmax in fp32, the
 * scaled query and the weights rounded to bf16 before they multiply (as `query * scale` and the bf16 weights of
 * autocast's route are), the output and every gradient rounded to bf16. With AVX-512 and heads of a multiple of 16
 * features the sums and the exponentials run on vectors (e^x as the attention kernel computes it), else in plain C.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16_math.h"

#define MAX_HEAD 256 /* the stack buffers' length */

/* Σ_d a[d] · b[d] for fp32 a and a bf16 row b; vectorised where the CPU has AVX-512 and Dh is a multiple of 16. */
static inline float dot_bf16(const float *a, const uint16_t *b, int64_t head_size) {
#ifdef VITLAB_AVX512
    if (head_size % 16 == 0) {
        __m512 sum = _mm512_setzero_ps();
        for (int64_t d = 0; d < head_size; d += 16)
            sum = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), load_bf16(b + d, 0xFFFF), sum);
        return _mm512_reduce_add_ps(sum);
    }
#endif
    float sum = 0.0f;
    for (int64_t d = 0; d < head_size; d++)
        sum += a[d] * bf16_to_float(b[d]);
    return sum;
}

/* sums[d] += factor · row[d] for a bf16 row. */
static inline void add_scaled_bf16(float *sums, float factor, const uint16_t *row, int64_t head_size) {
#ifdef VITLAB_AVX512
    if (head_size % 16 == 0) {
        __m512 scale = _mm512_set1_ps(factor);
        for (int64_t d = 0; d < head_size; d += 16)
            _mm512_storeu_ps(sums + d, _mm512_fmadd_ps(scale, load_bf16(row + d, 0xFFFF), _mm512_loadu_ps(sums + d)));
        return;
    }
#endif
    for (int64_t d = 0; d < head_size; d++)
        sums[d] += factor * bf16_to_float(row[d]);
}

/* target[d] = factor · values[d] rounded to bf16 (as float_to_bf16 rounds). */
static inline void store_scaled(uint16_t *target, float factor, const float *values, int64_t head_size) {
#ifdef VITLAB_AVX512
    if (head_size % 16 == 0) {
        __m512 scale = _mm512_set1_ps(factor);
        for (int64_t d = 0; d < head_size; d += 16)
            store_bf16(target + d, _mm512_mul_ps(scale, _mm512_loadu_ps(values + d)), 0xFFFF);
        return;
    }
#endif
    for (int64_t d = 0; d < head_size; d++)
        target[d] = float_to_bf16(factor * values[d]);
}

static inline float rounded_to_bf16(float value) { return bf16_to_float(float_to_bf16(value)); }

/* scaled[d] = query[d] · scale rounded to bf16 (as `query * scale` is), as fp32. */
static inline void scale_query(const uint16_t *query, float scale, int64_t head_size, float *scaled) {
    for (int64_t d = 0; d < head_size; d++)
        scaled[d] = rounded_to_bf16(bf16_to_float(query[d]) * scale);
}

/* One (image, head)'s scaled query and its scores against the T keys. */
static void scores_of(const uint16_t *query, const uint16_t *keys, int64_t key_stride, int64_t tokens, int64_t head_size,
                      float scale, int mask_first, float *scaled, float *scores) {
    scale_query(query, scale, head_size, scaled);
    for (int64_t t = 0; t < tokens; t++)
        scores[t] = dot_bf16(scaled, keys + t * key_stride, head_size);
    if (mask_first)
        scores[0] = -INFINITY;
}

/* scores → softmax weights, each rounded to bf16 (kept as fp32). */
static void softmax_of(float *scores, int64_t tokens) {
    float maximum = -INFINITY, total = 0.0f;
    for (int64_t t = 0; t < tokens; t++)
        maximum = scores[t] > maximum ? scores[t] : maximum;
    float shift = maximum == -INFINITY ? 0.0f : maximum;
    int64_t t = 0;
#ifdef VITLAB_AVX512
    __m512 sums = _mm512_setzero_ps();
    for (; t < tokens; t += 16) {
        __mmask16 inside = tail_mask(tokens - t);
        __m512 exponentials = exp_nonpositive_vector(_mm512_sub_ps(_mm512_maskz_loadu_ps(inside, scores + t), _mm512_set1_ps(shift)));
        exponentials = _mm512_maskz_mov_ps(inside, exponentials);
        _mm512_mask_storeu_ps(scores + t, inside, exponentials);
        sums = _mm512_add_ps(sums, exponentials);
    }
    total = _mm512_reduce_add_ps(sums);
#endif
    for (; t < tokens; t++) {
        scores[t] = expf(scores[t] - shift);
        total += scores[t];
    }
    float inverse = 1.0f / total;
    for (t = 0; t < tokens; t++)
        scores[t] = rounded_to_bf16(scores[t] * inverse);
}

/* query (B, H·Dh) bf16; key_value (B, T, 2, H, Dh) bf16 (keys, then values); scales (H) fp32; mask_first leaves out
 * token 0 (LSA: the query's own token). out (B, H·Dh) bf16 = softmax(scaled query · Kᵀ) V per head; weights (B, H, T)
 * fp32 (the bf16-rounded weights, for backward; not written if NULL). Returns 0, or 1 if a thread's buffer could not
 * be allocated (its items then not written: the caller discards the outputs). */
int vitlab_single_query_forward(const uint16_t *query, const uint16_t *key_value, const float *scales, int mask_first,
                                uint16_t *out, float *weights, int64_t batch, int64_t tokens, int64_t heads,
                                int64_t head_size, int threads) {
    int64_t hidden = heads * head_size, row = 2 * hidden;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *scores = malloc(sizeof(float) * (size_t)tokens), scaled[MAX_HEAD], mixed[MAX_HEAD];
        failed = scores == NULL;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < batch * heads; item++) {
            if (scores == NULL)
                continue;
            int64_t image = item / heads, head = item % heads;
            const uint16_t *keys = key_value + image * tokens * row + head * head_size, *values = keys + hidden;
            scores_of(query + image * hidden + head * head_size, keys, row, tokens, head_size, scales[head], mask_first,
                      scaled, scores);
            softmax_of(scores, tokens);
            for (int64_t d = 0; d < head_size; d++)
                mixed[d] = 0.0f;
            for (int64_t t = 0; t < tokens; t++)
                add_scaled_bf16(mixed, scores[t], values + t * row, head_size);
            store_scaled(out + image * hidden + head * head_size, 1.0f, mixed, head_size);
            if (weights != NULL)
                for (int64_t t = 0; t < tokens; t++)
                    weights[item * tokens + t] = scores[t];
        }
        free(scores);
    }
    return failed;
}

/* From the forward's inputs and weights and grad_out (B, H·Dh) bf16: grad_query (B, H·Dh) and grad_key_value
 * (B, T, 2, H, Dh) bf16, every element written, and grad_scale_sums (B, H) fp32: Σ_d query[d] · dL/d(scaled query)[d],
 * the gradient of scales[h] from image b. With w the weights, g = grad_out, dw_t = g · v_t, ds_t = w_t (dw_t − Σ_u w_u
 * dw_u): d(scaled query) = Σ_t ds_t k_t, grad_query = scale · that, dk_t = ds_t · scaled query, dv_t = w_t g. */
int vitlab_single_query_backward(const uint16_t *query, const uint16_t *key_value, const float *scales, const float *weights,
                                 const uint16_t *grad_out, uint16_t *grad_query, uint16_t *grad_key_value,
                                 float *grad_scale_sums, int64_t batch, int64_t tokens, int64_t heads, int64_t head_size,
                                 int threads) {
    int64_t hidden = heads * head_size, row = 2 * hidden;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *grad_scores = malloc(sizeof(float) * (size_t)tokens), scaled[MAX_HEAD], grad[MAX_HEAD], grad_scaled[MAX_HEAD];
        failed = grad_scores == NULL;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < batch * heads; item++) {
            if (grad_scores == NULL)
                continue;
            int64_t image = item / heads, head = item % heads, at = image * hidden + head * head_size;
            const uint16_t *keys = key_value + image * tokens * row + head * head_size, *values = keys + hidden;
            uint16_t *grad_keys = grad_key_value + image * tokens * row + head * head_size, *grad_values = grad_keys + hidden;
            const float *weight = weights + item * tokens;
            float scale = scales[head], weighted = 0.0f;
            scale_query(query + at, scale, head_size, scaled);
            for (int64_t d = 0; d < head_size; d++) {
                grad[d] = bf16_to_float(grad_out[at + d]);
                grad_scaled[d] = 0.0f;
            }
            for (int64_t t = 0; t < tokens; t++) {
                grad_scores[t] = dot_bf16(grad, values + t * row, head_size);
                store_scaled(grad_values + t * row, weight[t], grad, head_size);
                weighted += weight[t] * grad_scores[t];
            }
            for (int64_t t = 0; t < tokens; t++) {
                float grad_score = rounded_to_bf16(weight[t] * (grad_scores[t] - weighted));
                add_scaled_bf16(grad_scaled, grad_score, keys + t * row, head_size);
                store_scaled(grad_keys + t * row, grad_score, scaled, head_size);
            }
            float scale_sum = dot_bf16(grad_scaled, query + at, head_size);
            store_scaled(grad_query + at, scale, grad_scaled, head_size);
            grad_scale_sums[item] = scale_sum;
        }
        free(grad_scores);
    }
    return failed;
}

int64_t vitlab_single_query_max_head_size(void) { return MAX_HEAD; }
