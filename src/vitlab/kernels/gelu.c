/* GELU of bf16 activations that also writes its derivative, so that backward is one multiply.
 *
 * PyTorch's GELU keeps its input for backward, which recomputes erf and the normal density from it. Here forward
 * computes GELU(x) = x Φ(x) and GELU'(x) = Φ(x) + x φ(x) together, both from one exponential: Φ(x) = ½(1 + erf(x/√2))
 * with erf(z) = 1 − t P(t) e^{−z²}, t = 1 / (1 + p|z|) (Abramowitz & Stegun 7.1.26, |error| ≤ 1.5e-7, far below
 * bf16's rounding), and e^{−z²} = e^{−x²/2} = √(2π) φ(x). Backward reads the stored derivative instead of x.
 * Both outputs are rounded to bf16 (the derivative too: the gradient is rounded twice, where PyTorch rounds once).
 */
#include <stdlib.h>

#include "bf16_math.h"

#define PARALLEL_MIN_VECTORS 1024

#ifdef VITLAB_AVX512

int vitlab_gelu_supported(void) { return 1; }

/* x (count) bf16 → out = GELU(x), derivative = GELU'(x), both bf16. */
void vitlab_gelu_forward(const uint16_t *x, uint16_t *out, uint16_t *derivative, int64_t count, int threads) {
    int64_t vectors = (count + 15) / 16;
    const __m512 p = _mm512_set1_ps(0.3275911f * 0.70710678118654752f); /* p / √2: t from |x| directly */
    const __m512 a1 = _mm512_set1_ps(0.254829592f), a2 = _mm512_set1_ps(-0.284496736f), a3 = _mm512_set1_ps(1.421413741f);
    const __m512 a4 = _mm512_set1_ps(-1.453152027f), a5 = _mm512_set1_ps(1.061405429f);
    const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f), density = _mm512_set1_ps(0.39894228040143268f);
#pragma omp parallel for num_threads(threads) schedule(static) if (vectors >= PARALLEL_MIN_VECTORS)
    for (int64_t v = 0; v < vectors; v++) {
        __mmask16 mask = tail_mask(count - 16 * v);
        __m512 value = load_bf16(x + 16 * v, mask);
        __m512 magnitude = _mm512_abs_ps(value);
        __m512 denominator = _mm512_fmadd_ps(p, magnitude, one);
        __m512 t = _mm512_rcp14_ps(denominator);
        t = _mm512_mul_ps(t, _mm512_fnmadd_ps(denominator, t, _mm512_set1_ps(2.0f))); /* one Newton step: ~2^-28 */
        __m512 poly = _mm512_fmadd_ps(a5, t, a4);
        poly = _mm512_fmadd_ps(poly, t, a3);
        poly = _mm512_fmadd_ps(poly, t, a2);
        poly = _mm512_fmadd_ps(poly, t, a1);
        poly = _mm512_mul_ps(poly, t);
        __m512 gauss = exp_nonpositive_vector(_mm512_mul_ps(_mm512_mul_ps(value, value), _mm512_set1_ps(-0.5f))); /* e^{-x²/2} */
        __m512 tail = _mm512_mul_ps(_mm512_mul_ps(poly, gauss), half);                                          /* ½ (1 − erf(|x|/√2)) */
        __mmask16 negative = _mm512_cmp_ps_mask(value, _mm512_setzero_ps(), _CMP_LT_OQ);
        __m512 cdf = _mm512_mask_blend_ps(negative, _mm512_sub_ps(one, tail), tail); /* Φ(x) */
        store_bf16_rounded(out + 16 * v, _mm512_mul_ps(value, cdf), mask);
        store_bf16_rounded(derivative + 16 * v, _mm512_fmadd_ps(_mm512_mul_ps(value, gauss), density, cdf), mask);
    }
}

/* grad_x = grad_out · derivative, all bf16 (the product in fp32, rounded once). */
void vitlab_gelu_backward(const uint16_t *grad_out, const uint16_t *derivative, uint16_t *grad_x, int64_t count, int threads) {
    int64_t vectors = (count + 15) / 16;
#pragma omp parallel for num_threads(threads) schedule(static) if (vectors >= PARALLEL_MIN_VECTORS)
    for (int64_t v = 0; v < vectors; v++) {
        __mmask16 mask = tail_mask(count - 16 * v);
        store_bf16_rounded(grad_x + 16 * v, _mm512_mul_ps(load_bf16(grad_out + 16 * v, mask), load_bf16(derivative + 16 * v, mask)), mask);
    }
}

#else

int vitlab_gelu_supported(void) { return 0; }

void vitlab_gelu_forward(const uint16_t *x, uint16_t *out, uint16_t *derivative, int64_t count, int threads) {
    (void)x, (void)out, (void)derivative, (void)count, (void)threads;
    abort(); /* callers check vitlab_gelu_supported() first */
}

void vitlab_gelu_backward(const uint16_t *grad_out, const uint16_t *derivative, uint16_t *grad_x, int64_t count, int threads) {
    (void)grad_out, (void)derivative, (void)grad_x, (void)count, (void)threads;
    abort();
}

#endif
