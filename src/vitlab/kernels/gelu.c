/* GELU of bf16 activations that also writes its derivative, so that backward is one multiply; optionally with the
 * preceding linear layer's bias added first (and its gradient summed in backward).
 *
 * PyTorch's GELU keeps its input for backward, which recomputes erf and the normal density from it. Here forward
 * computes GELU(x) = x Φ(x) and GELU'(x) = Φ(x) + x φ(x) together, both from one exponential: Φ(x) = ½(1 + erf(x/√2))
 * with erf(z) = 1 − t P(t) e^{−z²}, t = 1 / (1 + p|z|) (Abramowitz & Stegun 7.1.26, |error| ≤ 1.5e-7, far below
 * bf16's rounding), and e^{−z²} = e^{−x²/2} = √(2π) φ(x). Backward reads the stored derivative instead of x.
 * Both outputs are rounded to bf16 (the derivative too: the gradient is rounded twice, where PyTorch rounds once).
 *
 * With a bias, x is a matmul's output without its bias (columns per row, a multiple of 16) and GELU takes x + bias
 * in fp32: the linear layer then skips copying its bias into its output before the matmul, and backward returns
 * the bias gradient (column sums of grad_x, in fp32) from the same pass instead of a separate sum.
 */
#include <stdlib.h>

#include <omp.h>

#include "bf16_math.h"

#define PARALLEL_MIN_VECTORS 1024

#ifdef VITLAB_AVX512

int vitlab_gelu_supported(void) { return 1; }

/* GELU(value) and GELU'(value) of 16 fp32 values. */
static inline void gelu_and_derivative(__m512 value, __m512 *gelu, __m512 *derivative) {
    const __m512 p = _mm512_set1_ps(0.3275911f * 0.70710678118654752f); /* p / √2: t from |x| directly */
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 magnitude = _mm512_abs_ps(value);
    __m512 denominator = _mm512_fmadd_ps(p, magnitude, one);
    __m512 t = _mm512_rcp14_ps(denominator);
    t = _mm512_mul_ps(t, _mm512_fnmadd_ps(denominator, t, _mm512_set1_ps(2.0f))); /* one Newton step: ~2^-28 */
    __m512 poly = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
    poly = _mm512_mul_ps(poly, t);
    __m512 gauss = exp_nonpositive_vector(_mm512_mul_ps(_mm512_mul_ps(value, value), _mm512_set1_ps(-0.5f))); /* e^{-x²/2} */
    __m512 tail = _mm512_mul_ps(_mm512_mul_ps(poly, gauss), _mm512_set1_ps(0.5f));                          /* ½ (1 − erf(|x|/√2)) */
    __mmask16 negative = _mm512_cmp_ps_mask(value, _mm512_setzero_ps(), _CMP_LT_OQ);
    __m512 cdf = _mm512_mask_blend_ps(negative, _mm512_sub_ps(one, tail), tail); /* Φ(x) */
    *gelu = _mm512_mul_ps(value, cdf);
    *derivative = _mm512_fmadd_ps(_mm512_mul_ps(value, gauss), _mm512_set1_ps(0.39894228040143268f), cdf);
}

/* x (count) bf16 [+ bias (columns) fp32, per column of rows of `columns`] → out = GELU, derivative = GELU', bf16.
 * bias may be NULL; with a bias, columns is a multiple of 16 that divides count. */
void vitlab_gelu_forward(const uint16_t *x, const float *bias, uint16_t *out, uint16_t *derivative, int64_t count,
                         int64_t columns, int threads) {
    int64_t vectors = (count + 15) / 16;
    if (bias != NULL) {
        int64_t rows = count / columns, column_vectors = columns / 16;
#pragma omp parallel for num_threads(threads) schedule(static) if (vectors >= PARALLEL_MIN_VECTORS)
        for (int64_t row = 0; row < rows; row++)
            for (int64_t c = 0; c < column_vectors; c++) {
                int64_t at = row * columns + 16 * c;
                __m512 value = _mm512_add_ps(load_bf16(x + at, 0xFFFF), _mm512_loadu_ps(bias + 16 * c)), gelu, slope;
                gelu_and_derivative(value, &gelu, &slope);
                store_bf16_rounded(out + at, gelu, 0xFFFF);
                store_bf16_rounded(derivative + at, slope, 0xFFFF);
            }
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static) if (vectors >= PARALLEL_MIN_VECTORS)
    for (int64_t v = 0; v < vectors; v++) {
        __mmask16 mask = tail_mask(count - 16 * v);
        __m512 value = load_bf16(x + 16 * v, mask), gelu, slope;
        gelu_and_derivative(value, &gelu, &slope);
        store_bf16_rounded(out + 16 * v, gelu, mask);
        store_bf16_rounded(derivative + 16 * v, slope, mask);
    }
}

/* grad_x = grad_out · derivative, all bf16 (the product in fp32, rounded once). With grad_bias (columns) not NULL,
 * also its column sums of the fp32 products, in a fixed order (each thread's rows, then the threads in turn).
 * Returns 0, or 1 (nothing written) if the per-thread sums could not be allocated. */
int vitlab_gelu_backward(const uint16_t *grad_out, const uint16_t *derivative, uint16_t *grad_x, float *grad_bias,
                         int64_t count, int64_t columns, int threads) {
    int64_t vectors = (count + 15) / 16;
    if (grad_bias == NULL) {
#pragma omp parallel for num_threads(threads) schedule(static) if (vectors >= PARALLEL_MIN_VECTORS)
        for (int64_t v = 0; v < vectors; v++) {
            __mmask16 mask = tail_mask(count - 16 * v);
            store_bf16_rounded(grad_x + 16 * v, _mm512_mul_ps(load_bf16(grad_out + 16 * v, mask), load_bf16(derivative + 16 * v, mask)), mask);
        }
        return 0;
    }
    int64_t rows = count / columns, column_vectors = columns / 16;
    float *partials = calloc((size_t)threads * columns, sizeof(float));
    if (partials == NULL)
        return 1;
#pragma omp parallel num_threads(threads)
    {
        float *own = partials + (int64_t)omp_get_thread_num() * columns;
#pragma omp for schedule(static)
        for (int64_t row = 0; row < rows; row++)
            for (int64_t c = 0; c < column_vectors; c++) {
                int64_t at = row * columns + 16 * c;
                __m512 product = _mm512_mul_ps(load_bf16(grad_out + at, 0xFFFF), load_bf16(derivative + at, 0xFFFF));
                store_bf16_rounded(grad_x + at, product, 0xFFFF);
                _mm512_storeu_ps(own + 16 * c, _mm512_add_ps(product, _mm512_loadu_ps(own + 16 * c)));
            }
    }
    for (int64_t f = 0; f < columns; f++) {
        float total = 0.0f;
        for (int t = 0; t < threads; t++)
            total += partials[(int64_t)t * columns + f];
        grad_bias[f] = total;
    }
    free(partials);
    return 0;
}

#else

int vitlab_gelu_supported(void) { return 0; }

void vitlab_gelu_forward(const uint16_t *x, const float *bias, uint16_t *out, uint16_t *derivative, int64_t count,
                         int64_t columns, int threads) {
    (void)x, (void)bias, (void)out, (void)derivative, (void)count, (void)columns, (void)threads;
    abort(); /* callers check vitlab_gelu_supported() first */
}

int vitlab_gelu_backward(const uint16_t *grad_out, const uint16_t *derivative, uint16_t *grad_x, float *grad_bias,
                         int64_t count, int64_t columns, int threads) {
    (void)grad_out, (void)derivative, (void)grad_x, (void)grad_bias, (void)count, (void)columns, (void)threads;
    abort();
}

#endif
