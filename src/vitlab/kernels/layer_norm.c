/* LayerNorm of fp32 rows into bf16, forward and backward, for the norms whose output only feeds a bf16 matmul (the
 * pre-norm ViT block's two: attention's QKV projection and the MLP's first layer).
 *
 * Under bf16 autocast PyTorch normalises in fp32, writes an fp32 output, and the next linear layer casts it to bf16;
 * backward casts the bf16 gradient to fp32 before LayerNorm's backward: four passes over memory besides the two
 * norms. Here forward reads x once and writes bf16 once (rounded to nearest even, as the cast does; with AVX-512 BF16
 * by the CPU's own conversion, which also flushes bf16 subnormals to 0), and backward
 * reads the bf16 gradient directly. Statistics as PyTorch keeps them: the mean and 1 / sqrt(biased variance + eps)
 * of each row, in fp32; the variance from a second pass over the row (x − mean)², not from E[x²] − mean².
 *
 * With an addend, the norm also does the residual add before it (the pre-norm block's x + proj(attention) before the
 * MLP's norm): forward takes the bf16 output of a matmul without its bias and the bias, writes the fp32 sum
 * x + addend + addend_bias (the new residual stream) and normalises that; backward adds the gradient that reaches the
 * stream from later on, and writes the total gradient once more in bf16 (for the matmul) and its column sums (for
 * the matmul's bias). PyTorch does the same in an add with a cast, an add of two gradients, a cast back and a sum.
 */
#include <stdlib.h>

#include <omp.h>

#include "bf16_math.h"

#define MAX_FEATURES 1024

#ifdef VITLAB_AVX512

int vitlab_layer_norm_supported(void) { return 1; }

/* x (rows, features) fp32 → y (rows, features) bf16, mean and rstd (rows) fp32. features: a multiple of 16.
 * With addend (rows, features) bf16 not NULL: the rows normalised are x + addend + addend_bias (addend_bias
 * (features) fp32, or NULL for none), and they are written to total (rows, features) fp32. */
void vitlab_layer_norm_forward(const float *x, const uint16_t *addend, const float *addend_bias, float *total,
                               const float *weight, const float *bias, uint16_t *y, float *mean, float *rstd, int64_t rows,
                               int64_t features, float eps, int threads) {
    int64_t vectors = features / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < rows; row++) {
        const float *values = x + row * features;
        __m512 sum = _mm512_setzero_ps();
        if (addend != NULL) {
            float *sums = total + row * features;
            for (int64_t v = 0; v < vectors; v++) {
                __m512 value = _mm512_add_ps(_mm512_loadu_ps(values + 16 * v), load_bf16(addend + row * features + 16 * v, 0xFFFF));
                if (addend_bias != NULL)
                    value = _mm512_add_ps(value, _mm512_loadu_ps(addend_bias + 16 * v));
                _mm512_storeu_ps(sums + 16 * v, value);
                sum = _mm512_add_ps(sum, value);
            }
            values = sums;
        } else {
            for (int64_t v = 0; v < vectors; v++)
                sum = _mm512_add_ps(sum, _mm512_loadu_ps(values + 16 * v));
        }
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
 * For a norm with an addend (x is then the saved total): grad_residual (rows, features) fp32, the gradient reaching
 * the total from elsewhere, is added into grad_x (NULL: none); grad_x_bf16 (NULL: not written) gets grad_x rounded to
 * bf16, and grad_column_sums (NULL: not written) its sums over rows. With all three of grad_x, grad_x_bf16 and
 * grad_column_sums NULL (an input that needs no gradient) only grad_weight and grad_bias are computed. Returns 0, or 1
 * (nothing written) if the per-thread sums could not be allocated. */
int vitlab_layer_norm_backward(const uint16_t *grad_y, const float *x, const float *weight, const float *mean,
                               const float *rstd, const float *grad_residual, float *grad_x, uint16_t *grad_x_bf16,
                               float *grad_weight, float *grad_bias, float *grad_column_sums, int64_t rows,
                               int64_t features, int threads) {
    int64_t vectors = features / 16, sums_per_thread = 3 * features;
    float *partials = calloc((size_t)threads * sums_per_thread, sizeof(float)); /* per thread: weight, bias, columns */
    if (partials == NULL)
        return 1;
    int input_gradient = grad_x != NULL || grad_x_bf16 != NULL || grad_column_sums != NULL;
#pragma omp parallel num_threads(threads)
    {
        float *own_weight = partials + (int64_t)omp_get_thread_num() * sums_per_thread, *own_bias = own_weight + features;
        float *own_columns = own_bias + features;
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
            if (!input_gradient)
                continue;
            __m512 mean_g = _mm512_set1_ps(_mm512_reduce_add_ps(sum_g) / (float)features);
            __m512 mean_g_xhat = _mm512_set1_ps(_mm512_reduce_add_ps(sum_g_xhat) / (float)features);
            for (int64_t v = 0; v < vectors; v++) {
                int64_t at = row * features + 16 * v;
                __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(values + 16 * v), centre), scale);
                __m512 g = _mm512_mul_ps(load_bf16(grads + 16 * v, 0xFFFF), _mm512_loadu_ps(weight + 16 * v));
                __m512 inner = _mm512_sub_ps(_mm512_sub_ps(g, mean_g), _mm512_mul_ps(xhat, mean_g_xhat));
                __m512 out = _mm512_mul_ps(scale, inner);
                if (grad_residual != NULL)
                    out = _mm512_add_ps(out, _mm512_loadu_ps(grad_residual + at));
                if (grad_x != NULL)
                    _mm512_storeu_ps(grad_x + at, out);
                if (grad_x_bf16 != NULL)
                    store_bf16_rounded(grad_x_bf16 + at, out, 0xFFFF);
                if (grad_column_sums != NULL)
                    _mm512_storeu_ps(own_columns + 16 * v, _mm512_add_ps(out, _mm512_loadu_ps(own_columns + 16 * v)));
            }
        }
    }
    for (int64_t f = 0; f < features; f++) {
        float weight_total = 0.0f, bias_total = 0.0f, column_total = 0.0f;
        for (int t = 0; t < threads; t++) {
            weight_total += partials[(int64_t)t * sums_per_thread + f];
            bias_total += partials[(int64_t)t * sums_per_thread + features + f];
            column_total += partials[(int64_t)t * sums_per_thread + 2 * features + f];
        }
        grad_weight[f] = weight_total;
        grad_bias[f] = bias_total;
        if (grad_column_sums != NULL)
            grad_column_sums[f] = column_total;
    }
    free(partials);
    return 0;
}

#else

int vitlab_layer_norm_supported(void) { return 0; }

void vitlab_layer_norm_forward(const float *x, const uint16_t *addend, const float *addend_bias, float *total,
                               const float *weight, const float *bias, uint16_t *y, float *mean, float *rstd, int64_t rows,
                               int64_t features, float eps, int threads) {
    (void)x, (void)addend, (void)addend_bias, (void)total, (void)weight, (void)bias, (void)y, (void)mean, (void)rstd;
    (void)rows, (void)features, (void)eps, (void)threads;
    abort(); /* callers check vitlab_layer_norm_supported() first */
}

int vitlab_layer_norm_backward(const uint16_t *grad_y, const float *x, const float *weight, const float *mean,
                               const float *rstd, const float *grad_residual, float *grad_x, uint16_t *grad_x_bf16,
                               float *grad_weight, float *grad_bias, float *grad_column_sums, int64_t rows,
                               int64_t features, int threads) {
    (void)grad_y, (void)x, (void)weight, (void)mean, (void)rstd, (void)grad_residual, (void)grad_x, (void)grad_x_bf16;
    (void)grad_weight, (void)grad_bias, (void)grad_column_sums, (void)rows, (void)features, (void)threads;
    abort();
}

#endif

int64_t vitlab_layer_norm_max_features(void) { return MAX_FEATURES; }
