/* Softmax over the last axis of bf16 attention scores, forward and backward, each in one pass over its rows.
 *
 * PyTorch's CPU softmax was bounded by its exp (docs/performance.md); here exp is a short polynomial that is
 * exact to a few fp32 ulps, far below bf16's rounding. Forward can leave out each token's score for itself
 * (the diagonal of every T × T block: LSA, Lee et al. 2021) without a separate pass to mask it.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define PARALLEL_MIN_ROWS 256
#define MAX_COLUMNS 4096

static inline float bf16_to_float(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

/* Round to nearest even, as PyTorch's float → bf16 conversion does; a NaN stays a (quiet) NaN. */
static inline uint16_t float_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    uint32_t quiet_nan = (bits >> 16) | 0x40u;
    return (uint16_t)(((bits & 0x7FFFFFFFu) > 0x7F800000u) ? quiet_nan : rounded);
}

/* e^x for x <= 0 (scores minus their row maximum): 2^n · p(r) with x = n ln 2 + r, |r| <= ln2 / 2, and p the
 * degree-6 Taylor polynomial (relative error below 2e-7 there). Below -87 the result is 0, as e^x is in fp32 (-inf
 * included; a NaN gives NaN). */
static inline float exp_nonpositive(float x) {
    float clamped = x < -87.0f ? -87.0f : x;
    float n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 · 2^23 */
    float r = clamped - n * 0.693145751953125f - n * 1.428606765330187e-06f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667e-1f + r * (4.1666668e-2f + r * (8.3333338e-3f + r * 1.3888889e-3f)))));
    int32_t exponent = ((int32_t)n + 127) << 23;
    float power;
    memcpy(&power, &exponent, sizeof power);
    float result = p * power;
    return x < -87.0f ? 0.0f : (x != x ? x : result);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

/* The same row functions written with AVX-512: 16 columns at a time, the row's tail through masked loads. */
static inline __m512 load_bf16(const uint16_t *source, __mmask16 mask) {
    __m256i bits = _mm256_maskz_loadu_epi16(mask, source);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

static inline void store_bf16(uint16_t *target, __m512 values, __mmask16 mask) {
    __m512i bits = _mm512_castps_si512(values);
    __m512i rounded = _mm512_srli_epi32(
        _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(values, values, _CMP_UNORD_Q);
    rounded = _mm512_mask_or_epi32(rounded, nan, _mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
    _mm256_mask_storeu_epi16(target, mask, _mm512_cvtepi32_epi16(rounded));
}

static inline __m512 exp_nonpositive_vector(__m512 x) {
    __m512 clamped = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), clamped);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.3888889e-3f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3333338e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1666668e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666667e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    __m512 result = _mm512_scalef_ps(p, n);  /* p · 2^n */
    result = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ), result, _mm512_setzero_ps());
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), result, x);
}

static inline __mmask16 tail_mask(int64_t remaining) { return remaining >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << remaining) - 1u); }

static void softmax_row(const uint16_t *scores, uint16_t *out, int64_t columns, int64_t masked_column) {
    __m512 values[MAX_COLUMNS / 16];
    __m512 maximum = _mm512_set1_ps(-INFINITY);
    int64_t vectors = (columns + 15) / 16;
    for (int64_t vector = 0; vector < vectors; vector++) {
        __mmask16 mask = tail_mask(columns - 16 * vector);
        __m512 value = _mm512_mask_blend_ps(mask, _mm512_set1_ps(-INFINITY), load_bf16(scores + 16 * vector, mask));
        if (masked_column >= 16 * vector && masked_column < 16 * vector + 16)
            value = _mm512_mask_blend_ps((__mmask16)(1u << (masked_column - 16 * vector)), value, _mm512_set1_ps(-INFINITY));
        values[vector] = value;
        maximum = _mm512_max_ps(maximum, value);
    }
    float row_maximum = _mm512_reduce_max_ps(maximum);
    __m512 shift = _mm512_set1_ps(row_maximum == -INFINITY ? 0.0f : row_maximum);
    __m512 total = _mm512_setzero_ps();
    for (int64_t vector = 0; vector < vectors; vector++) {
        values[vector] = exp_nonpositive_vector(_mm512_sub_ps(values[vector], shift));
        total = _mm512_add_ps(total, values[vector]);
    }
    __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    for (int64_t vector = 0; vector < vectors; vector++)
        store_bf16(out + 16 * vector, _mm512_mul_ps(values[vector], inverse), tail_mask(columns - 16 * vector));
}

static void softmax_backward_row(const uint16_t *y, const uint16_t *grad_y, uint16_t *grad_scores, int64_t columns) {
    int64_t vectors = (columns + 15) / 16;
    __m512 dot = _mm512_setzero_ps();
    for (int64_t vector = 0; vector < vectors; vector++) {
        __mmask16 mask = tail_mask(columns - 16 * vector);
        dot = _mm512_fmadd_ps(load_bf16(y + 16 * vector, mask), load_bf16(grad_y + 16 * vector, mask), dot);
    }
    __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(dot));
    for (int64_t vector = 0; vector < vectors; vector++) {
        __mmask16 mask = tail_mask(columns - 16 * vector);
        __m512 value = _mm512_mul_ps(load_bf16(y + 16 * vector, mask), _mm512_sub_ps(load_bf16(grad_y + 16 * vector, mask), total));
        store_bf16(grad_scores + 16 * vector, value, mask);
    }
}
#else
static void softmax_row(const uint16_t *scores, uint16_t *out, int64_t columns, int64_t masked_column) {
    float values[MAX_COLUMNS];
    float maximum = -INFINITY;
#pragma omp simd reduction(max : maximum)
    for (int64_t column = 0; column < columns; column++) {
        float value = column == masked_column ? -INFINITY : bf16_to_float(scores[column]);
        values[column] = value;
        maximum = fmaxf(maximum, value);
    }
    if (maximum == -INFINITY)
        maximum = 0.0f; /* a row of -inf only: every exp is 0, the result 0/0 = NaN as PyTorch gives */
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t column = 0; column < columns; column++) {
        values[column] = exp_nonpositive(values[column] - maximum);
        total += values[column];
    }
    float inverse = 1.0f / total;
    for (int64_t column = 0; column < columns; column++)
        out[column] = float_to_bf16(values[column] * inverse);
}


static void softmax_backward_row(const uint16_t *y, const uint16_t *grad_y, uint16_t *grad_scores, int64_t columns) {
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t column = 0; column < columns; column++)
        dot += bf16_to_float(y[column]) * bf16_to_float(grad_y[column]);
    for (int64_t column = 0; column < columns; column++)
        grad_scores[column] = float_to_bf16(bf16_to_float(y[column]) * (bf16_to_float(grad_y[column]) - dot));
}
#endif

/* out = softmax(scores) row by row; rows of `columns` scores. With mask_diagonal, row r leaves out column
 * r mod columns (the scores are stacked square blocks). */
void vitlab_softmax_bf16(const uint16_t *scores, uint16_t *out, int64_t rows, int64_t columns, int mask_diagonal,
                         int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows >= PARALLEL_MIN_ROWS)
    for (int64_t row = 0; row < rows; row++)
        softmax_row(scores + row * columns, out + row * columns, columns, mask_diagonal ? row % columns : -1);
}

/* grad_scores = y ⊙ (grad_y − Σ y ⊙ grad_y) row by row, from softmax's output y. */
void vitlab_softmax_backward_bf16(const uint16_t *y, const uint16_t *grad_y, uint16_t *grad_scores, int64_t rows,
                                  int64_t columns, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows >= PARALLEL_MIN_ROWS)
    for (int64_t row = 0; row < rows; row++)
        softmax_backward_row(y + row * columns, grad_y + row * columns, grad_scores + row * columns, columns);
}

int64_t vitlab_softmax_max_columns(void) { return MAX_COLUMNS; }
