/* Softmax over the last axis of bf16 attention scores, forward and backward, each in one pass over its rows.
 *
 * PyTorch's CPU softmax was bounded by its exp (docs/performance.md); here exp is a short polynomial that is
 * exact to a few fp32 ulps, far below bf16's rounding. Forward can leave out each token's score for itself
 * (the diagonal of every T × T block: LSA, Lee et al. 2021) without a separate pass to mask it.
 */
#include <stdlib.h>

#include "bf16_math.h"

#define PARALLEL_MIN_ROWS 256
#define MAX_COLUMNS 4096

#ifdef VITLAB_AVX512
/* The row functions written with AVX-512: 16 columns at a time, the row's tail through masked loads. */
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
/* Without AVX-512 PyTorch's own vectorised softmax is the faster one: callers check vitlab_softmax_supported(). */
static void softmax_row(const uint16_t *scores, uint16_t *out, int64_t columns, int64_t masked_column) {
    (void)scores, (void)out, (void)columns, (void)masked_column;
    abort();
}

static void softmax_backward_row(const uint16_t *y, const uint16_t *grad_y, uint16_t *grad_scores, int64_t columns) {
    (void)y, (void)grad_y, (void)grad_scores, (void)columns;
    abort();
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

#ifdef VITLAB_AVX512
int vitlab_softmax_supported(void) { return 1; }
#else
int vitlab_softmax_supported(void) { return 0; }
#endif
