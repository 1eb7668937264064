/* LayerNorm of fp32 rows into bf16, forward and backward, for the norms whose output only feeds a bf16 matmul (the
 * pre-norm ViT block's two: attention's QKV projection and the MLP's first layer).
 *
 * Under bf16 autocast PyTorch normalises in fp32, writes an fp32 output, and the next linear layer casts it to bf16;
 * backward casts the bf16 gradient to fp32 before LayerNorm's backward: four passes over memory besides the two
 * norms. Here forward reads x once and writes bf16 once (rounded to nearest even, as the cast does; with AVX-512 BF16
 * by the CPU's own conversion, which also flushes bf16 subnormals to 0), and backward
 * reads the bf16 gradient directly. Statistics as PyTorch keeps them: the mean and 1 / sqrt(biased variance + eps)
 * of each row, in fp32; the variance from a second pass over the row (x − mean)², not from E[x²] − mean².
 */
#include <stdlib.h>

#include <omp.h>

#include "bf16_math.h"

#define MAX_FEATURES 1024

#ifdef VITLAB_AVX512

int vitlab_layer_norm_supported(void) { return 1; }

/* x (rows, features) fp32 → y (rows, features) bf16, mean and rstd (rows) fp32. features: a multiple of 16. */
void vitlab_layer_norm_forward(const float *x, const float *weight, const float *bias, uint16_t *y, float *mean,
                               float *rstd, int64_t rows, int64_t features, float eps, int threads) {
    int64_t vectors = features / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < rows; row++) {
        const float *values = x + row * features;
        __m512 sum = _mm512_setzero_ps();
        for (int64_t v = 0; v < vectors; v++)
            sum = _mm512_add_ps(sum, _mm512_loadu_ps(values + 16 * v));
        float row_mean = _mm512_reduce_add_ps(sum) / (float)features;
        __m512 centre = _mm512_set1_ps(row_mean), squares = _mm512_setzero_ps();
        for (int64_t v = 0; v < vectors; v++) {
            __m512 centred = _mm512_sub_ps(_mm512_loadu_ps(values + 16 * v), centre);
            squares = _mm512_fmadd_ps(centred, centred, squares);
        }
        float row_rstd = 1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)features + eps);
        __m512 scale = _mm512_set1_ps(row_rstd);
        for (int64_t v = 0; v < vectors; v++) {
            __m512 normalised = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(values + 16 * v), centre), scale);
            __m512 out = _mm512_fmadd_ps(normalised, _mm512_loadu_ps(weight + 16 * v), _mm512_loadu_ps(bias + 16 * v));
            store_bf16_rounded(y + row * features + 16 * v, out, 0xFFFF);
        }
        mean[row] = row_mean;
        rstd[row] = row_rstd;
    }
}

/* From grad_y (rows, features) bf16, x, weight, mean, rstd: grad_x (rows, features) fp32, and grad_weight and
 * grad_bias (features) fp32, summed over rows in a fixed order (each thread's rows, then the threads in turn).
 * With x̂ = (x − mean) · rstd and g = grad_y · weight: grad_x = rstd · (g − mean(g) − x̂ · mean(g · x̂)).
 * Returns 0, or 1 (nothing written) if the per-thread sums could not be allocated. */
int vitlab_layer_norm_backward(const uint16_t *grad_y, const float *x, const float *weight, const float *mean,
                               const float *rstd, float *grad_x, float *grad_weight, float *grad_bias, int64_t rows,
                               int64_t features, int threads) {
    int64_t vectors = features / 16;
    float *partials = calloc((size_t)threads * 2 * features, sizeof(float)); /* per thread: grad_weight, grad_bias */
    if (partials == NULL)
        return 1;
#pragma omp parallel num_threads(threads)
    {
        float *own_weight = partials + (int64_t)omp_get_thread_num() * 2 * features, *own_bias = own_weight + features;
#pragma omp for schedule(static)
        for (int64_t row = 0; row < rows; row++) {
            const float *values = x + row * features;
            const uint16_t *grads = grad_y + row * features;
            __m512 centre = _mm512_set1_ps(mean[row]), scale = _mm512_set1_ps(rstd[row]);
            __m512 sum_g = _mm512_setzero_ps(), sum_g_xhat = _mm512_setzero_ps();
            for (int64_t v = 0; v < vectors; v++) {
                __m512 grad = load_bf16(grads + 16 * v, 0xFFFF);
                __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(values + 16 * v), centre), scale);
                __m512 g = _mm512_mul_ps(grad, _mm512_loadu_ps(weight + 16 * v));
                sum_g = _mm512_add_ps(sum_g, g);
                sum_g_xhat = _mm512_fmadd_ps(g, xhat, sum_g_xhat);
                _mm512_storeu_ps(own_weight + 16 * v, _mm512_fmadd_ps(grad, xhat, _mm512_loadu_ps(own_weight + 16 * v)));
                _mm512_storeu_ps(own_bias + 16 * v, _mm512_add_ps(grad, _mm512_loadu_ps(own_bias + 16 * v)));
            }
            __m512 mean_g = _mm512_set1_ps(_mm512_reduce_add_ps(sum_g) / (float)features);
            __m512 mean_g_xhat = _mm512_set1_ps(_mm512_reduce_add_ps(sum_g_xhat) / (float)features);
            for (int64_t v = 0; v < vectors; v++) {
                __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(values + 16 * v), centre), scale);
                __m512 g = _mm512_mul_ps(load_bf16(grads + 16 * v, 0xFFFF), _mm512_loadu_ps(weight + 16 * v));
                __m512 inner = _mm512_sub_ps(_mm512_sub_ps(g, mean_g), _mm512_mul_ps(xhat, mean_g_xhat));
                _mm512_storeu_ps(grad_x + row * features + 16 * v, _mm512_mul_ps(scale, inner));
            }
        }
    }
    for (int64_t f = 0; f < features; f++) {
        float weight_total = 0.0f, bias_total = 0.0f;
        for (int t = 0; t < threads; t++) {
            weight_total += partials[(int64_t)t * 2 * features + f];
            bias_total += partials[(int64_t)t * 2 * features + features + f];
        }
        grad_weight[f] = weight_total;
        grad_bias[f] = bias_total;
    }
    free(partials);
    return 0;
}

#else

int vitlab_layer_norm_supported(void) { return 0; }

void vitlab_layer_norm_forward(const float *x, const float *weight, const float *bias, uint16_t *y, float *mean,
                               float *rstd, int64_t rows, int64_t features, float eps, int threads) {
    (void)x, (void)weight, (void)bias, (void)y, (void)mean, (void)rstd, (void)rows, (void)features, (void)eps, (void)threads;
    abort(); /* callers check vitlab_layer_norm_supported() first */
}

int vitlab_layer_norm_backward(const uint16_t *grad_y, const float *x, const float *weight, const float *mean,
                               const float *rstd, float *grad_x, float *grad_weight, float *grad_bias, int64_t rows,
                               int64_t features, int threads) {
    (void)grad_y, (void)x, (void)weight, (void)mean, (void)rstd, (void)grad_x, (void)grad_weight, (void)grad_bias;
    (void)rows, (void)features, (void)threads;
    abort();
}

#endif

int64_t vitlab_layer_norm_max_features(void) { return MAX_FEATURES; }
