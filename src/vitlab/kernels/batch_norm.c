/* Training-mode BatchNorm over channels-last bf16 activations, with the ReLU after it or without, forward and backward.
 *
 * Under CPU bf16 autocast a CNN's BatchNorm runs in bf16 with fp32 statistics. PyTorch reads the input three times
 * (mean, variance, output), then the ReLU reads and writes the output again; backward masks the output gradient in
 * ReLU's pass and BatchNorm's own backward reads that and its input twice more, each in a separate operator. Here
 * forward reads x three times (mean; the sum of squared deviations from it; the output, with the ReLU, written once)
 * and backward reads the output gradient and x twice (the two sums; the input gradient, written once), the ReLU's mask
 * recomputed from x with forward's own arithmetic.
 *
 * Layout: x, the output and the gradients are (rows, channels) bf16, rows = batch · height · width (a channels-last
 * NCHW tensor's memory); channels a multiple of 16. Statistics and parameters are fp32 vectors of `channels`.
 *
 * Numerics (as PyTorch's bf16 path, with sums added in another order):
 * - mean = Σx / rows, variance = Σ(x − mean)² / rows (biased, what normalises), invstd = 1 / √(variance + eps), eps
 *   a double as PyTorch's. Sums run in fp32 over chunks of CHUNK_ROWS rows and in double across chunks and threads.
 * - y = x · scale + shift with scale = weight · invstd and shift = bias − mean · scale (weight 1, bias 0 where none), in
 *   fp32, then ReLU'd or not, rounded to bf16.
 * - g = the output gradient where the ReLU passed it (its rounded output not ≤ 0, as threshold_backward decides: a NaN
 *   of either sign passes), else 0;
 *   grad_bias = Σg, grad_weight = Σ g·(x − mean) · invstd, and
 *   grad_x = (g − Σg / rows − (x − mean) · k) · invstd · weight with k = Σ g·(x − mean) · invstd² / rows, rounded to bf16.
 */
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "bf16_math.h"

#define CHUNK_ROWS 64
#define GROUP_VECTORS 4 /* channels summed in registers at once: 4 vectors of 16 */
#define PARALLEL_MIN_ELEMENTS 65536

#ifdef VITLAB_AVX512

int vitlab_batch_norm_supported(void) { return 1; }

enum Sums { MEAN, SQUARES, GRADIENT };

/* sums[0..15] += the 16 lanes, in double. */
static inline void add_to_doubles(double *sums, __m512 values) {
    __m512d low = _mm512_cvtps_pd(_mm512_castps512_ps256(values));
    __m512d high = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(values), 1)));
    _mm512_storeu_pd(sums, _mm512_add_pd(_mm512_loadu_pd(sums), low));
    _mm512_storeu_pd(sums + 8, _mm512_add_pd(_mm512_loadu_pd(sums + 8), high));
}

/* The output gradient where the ReLU passed it: where y = max(0, x · scale + shift), rounded to bf16, is not <= 0,
 * as threshold_backward decides: above 0 (bits 1 … 0x7FFF) or NaN of either sign. */
static inline __m512 relu_passed(__m512 gradient, __m512 x, __m512 scale, __m512 shift) {
    __m512 y = _mm512_max_ps(_mm512_setzero_ps(), _mm512_fmadd_ps(x, scale, shift)); /* NaN stays NaN, as ReLU's */
    __m512i below = _mm512_sub_epi32(bf16_bits(y), _mm512_set1_epi32(1));
    __mmask16 passed = _mm512_cmplt_epu32_mask(below, _mm512_set1_epi32(0x7FFF))
                       | _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
    return _mm512_maskz_mov_ps(passed, gradient);
}

/* For `vectors` (≤ GROUP_VECTORS) blocks of 16 channels from `channel` on, over rows [first, last): add to first_sums
 * Σx (MEAN), Σ(x − center)² (SQUARES), or Σg to first_sums and Σ g·(x − center) to second_sums (GRADIENT, g the
 * gradient, ReLU-masked if `with_relu`). Inlined per mode and vector count, so both are constants in each copy. */
static inline __attribute__((always_inline)) void channel_block_sums(
    const uint16_t *x, const uint16_t *gradient, const float *center, const float *scale, const float *shift,
    int64_t first, int64_t last, int64_t channels, int64_t channel, int vectors, int mode, int with_relu,
    double *first_sums, double *second_sums) {
    __m512 centers[GROUP_VECTORS], scales[GROUP_VECTORS], shifts[GROUP_VECTORS];
    for (int v = 0; v < vectors; v++) {
        centers[v] = mode == MEAN ? _mm512_setzero_ps() : _mm512_loadu_ps(center + channel + 16 * v);
        scales[v] = with_relu ? _mm512_loadu_ps(scale + channel + 16 * v) : _mm512_setzero_ps();
        shifts[v] = with_relu ? _mm512_loadu_ps(shift + channel + 16 * v) : _mm512_setzero_ps();
    }
    for (int64_t chunk = first; chunk < last; chunk += CHUNK_ROWS) {
        int64_t end = chunk + CHUNK_ROWS < last ? chunk + CHUNK_ROWS : last;
        __m512 one[GROUP_VECTORS], two[GROUP_VECTORS];
        for (int v = 0; v < vectors; v++)
            one[v] = two[v] = _mm512_setzero_ps();
        for (int64_t row = chunk; row < end; row++)
            for (int v = 0; v < vectors; v++) {
                int64_t at = row * channels + channel + 16 * v;
                __m512 value = load_bf16(x + at, 0xFFFF);
                if (mode == MEAN) {
                    one[v] = _mm512_add_ps(one[v], value);
                } else if (mode == SQUARES) {
                    __m512 deviation = _mm512_sub_ps(value, centers[v]);
                    one[v] = _mm512_fmadd_ps(deviation, deviation, one[v]);
                } else {
                    __m512 g = load_bf16(gradient + at, 0xFFFF);
                    if (with_relu)
                        g = relu_passed(g, value, scales[v], shifts[v]);
                    one[v] = _mm512_add_ps(one[v], g);
                    two[v] = _mm512_fmadd_ps(g, _mm512_sub_ps(value, centers[v]), two[v]);
                }
            }
        for (int v = 0; v < vectors; v++) {
            add_to_doubles(first_sums + channel + 16 * v, one[v]);
            if (mode == GRADIENT)
                add_to_doubles(second_sums + channel + 16 * v, two[v]);
        }
    }
}

static inline __attribute__((always_inline)) void row_range_sums(
    const uint16_t *x, const uint16_t *gradient, const float *center, const float *scale, const float *shift,
    int64_t first, int64_t last, int64_t channels, int mode, int with_relu, double *first_sums, double *second_sums) {
    for (int64_t channel = 0; channel < channels; channel += 16 * GROUP_VECTORS) {
        int64_t left = (channels - channel) / 16;
        switch (left >= GROUP_VECTORS ? GROUP_VECTORS : left) {
        case 4: channel_block_sums(x, gradient, center, scale, shift, first, last, channels, channel, 4, mode, with_relu, first_sums, second_sums); break;
        case 3: channel_block_sums(x, gradient, center, scale, shift, first, last, channels, channel, 3, mode, with_relu, first_sums, second_sums); break;
        case 2: channel_block_sums(x, gradient, center, scale, shift, first, last, channels, channel, 2, mode, with_relu, first_sums, second_sums); break;
        default: channel_block_sums(x, gradient, center, scale, shift, first, last, channels, channel, 1, mode, with_relu, first_sums, second_sums); break;
        }
    }
}

/* The sums of `row_range_sums` over all rows, each thread over its share into its own doubles, added at the end into
 * first_total (and second_total for GRADIENT). Returns 0, or -1 if the per-thread sums could not be allocated. */
static int all_row_sums(const uint16_t *x, const uint16_t *gradient, const float *center, const float *scale,
                        const float *shift, int64_t rows, int64_t channels, int mode, int with_relu, int threads,
                        double *first_total, double *second_total) {
    if (rows * channels < PARALLEL_MIN_ELEMENTS || threads < 1)
        threads = 1;
    double *partial = calloc((size_t)threads * 2 * (size_t)channels, sizeof(double));
    if (partial == NULL)
        return -1;
#pragma omp parallel num_threads(threads)
    {
        int thread = omp_get_thread_num(), team = omp_get_num_threads();
        int64_t first = rows * thread / team, last = rows * (thread + 1) / team;
        double *mine = partial + (size_t)thread * 2 * (size_t)channels;
        if (mode == MEAN)
            row_range_sums(x, gradient, center, scale, shift, first, last, channels, MEAN, 0, mine, mine + channels);
        else if (mode == SQUARES)
            row_range_sums(x, gradient, center, scale, shift, first, last, channels, SQUARES, 0, mine, mine + channels);
        else if (with_relu)
            row_range_sums(x, gradient, center, scale, shift, first, last, channels, GRADIENT, 1, mine, mine + channels);
        else
            row_range_sums(x, gradient, center, scale, shift, first, last, channels, GRADIENT, 0, mine, mine + channels);
    }
    for (int64_t c = 0; c < channels; c++) {
        double one = 0.0, two = 0.0;
        for (int thread = 0; thread < threads; thread++) {
            one += partial[(size_t)thread * 2 * (size_t)channels + c];
            two += partial[(size_t)thread * 2 * (size_t)channels + channels + c];
        }
        first_total[c] = one;
        if (second_total != NULL)
            second_total[c] = two;
    }
    free(partial);
    return 0;
}

/* scale = weight · invstd and shift = bias − mean · scale (weight 1 and bias 0 where NULL), the same in both
 * directions, so that backward's ReLU mask is forward's. */
static void affine_constants(const float *mean, const float *invstd, const float *weight, const float *bias,
                             int64_t channels, float *scale, float *shift) {
    for (int64_t c = 0; c < channels; c++) {
        scale[c] = (weight != NULL ? weight[c] : 1.0f) * invstd[c];
        shift[c] = (bias != NULL ? bias[c] : 0.0f) - mean[c] * scale[c];
    }
}

int vitlab_batch_norm_forward_bf16(const void *x_bits, void *y_bits, const float *weight, const float *bias, float *mean,
                                   float *variance, float *invstd, int64_t rows, int64_t channels, double eps,
                                   int with_relu, int threads) {
    const uint16_t *x = x_bits;
    uint16_t *y = y_bits;
    double *sums = malloc(2 * (size_t)channels * sizeof(double));
    float *constants = malloc(2 * (size_t)channels * sizeof(float));
    int failed = sums == NULL || constants == NULL;
    if (!failed)
        failed = all_row_sums(x, NULL, NULL, NULL, NULL, rows, channels, MEAN, 0, threads, sums, NULL);
    if (!failed) {
        for (int64_t c = 0; c < channels; c++)
            mean[c] = (float)(sums[c] / (double)rows);
        failed = all_row_sums(x, NULL, mean, NULL, NULL, rows, channels, SQUARES, 0, threads, sums, NULL);
    }
    if (!failed) {
        for (int64_t c = 0; c < channels; c++) {
            double biased = sums[c] / (double)rows;
            variance[c] = (float)biased;
            invstd[c] = (float)(1.0 / sqrt(biased + eps));
        }
        float *scale = constants, *shift = constants + channels;
        affine_constants(mean, invstd, weight, bias, channels, scale, shift);
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * channels >= PARALLEL_MIN_ELEMENTS)
        for (int64_t row = 0; row < rows; row++)
            for (int64_t c = 0; c < channels; c += 16) {
                __m512 value = _mm512_fmadd_ps(load_bf16(x + row * channels + c, 0xFFFF), _mm512_loadu_ps(scale + c),
                                               _mm512_loadu_ps(shift + c));
                if (with_relu)
                    value = _mm512_max_ps(_mm512_setzero_ps(), value); /* NaN stays NaN, as ReLU's */
                store_bf16(y + row * channels + c, value, 0xFFFF);
            }
    }
    free(sums);
    free(constants);
    return failed ? -1 : 0;
}

int vitlab_batch_norm_backward_bf16(const void *grad_out_bits, const void *x_bits, const float *mean, const float *invstd,
                                    const float *weight, const float *bias, void *grad_x_bits, float *grad_weight,
                                    float *grad_bias, int64_t rows, int64_t channels, int with_relu, int threads) {
    const uint16_t *grad_out = grad_out_bits, *x = x_bits;
    uint16_t *grad_x = grad_x_bits;
    double *sums = malloc(2 * (size_t)channels * sizeof(double));
    float *constants = malloc(5 * (size_t)channels * sizeof(float));
    int failed = sums == NULL || constants == NULL;
    if (!failed) {
        float *scale = constants, *shift = constants + channels;
        affine_constants(mean, invstd, weight, bias, channels, scale, shift);
        failed = all_row_sums(x, grad_out, mean, scale, shift, rows, channels, GRADIENT, with_relu, threads, sums,
                              sums + channels);
    }
    if (!failed) {
        float *scale = constants, *shift = constants + channels, *mean_gradient = constants + 2 * channels;
        float *slope = constants + 3 * channels, *factor = constants + 4 * channels;
        for (int64_t c = 0; c < channels; c++) {
            double gradient_sum = sums[c], product_sum = sums[channels + c];
            if (grad_bias != NULL)
                grad_bias[c] = (float)gradient_sum;
            if (grad_weight != NULL)
                grad_weight[c] = (float)(product_sum * invstd[c]);
            mean_gradient[c] = (float)(gradient_sum / (double)rows);
            slope[c] = (float)(product_sum / (double)rows * invstd[c] * invstd[c]);
            factor[c] = invstd[c] * (weight != NULL ? weight[c] : 1.0f);
        }
        if (grad_x != NULL) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * channels >= PARALLEL_MIN_ELEMENTS)
            for (int64_t row = 0; row < rows; row++)
                for (int64_t c = 0; c < channels; c += 16) {
                    int64_t at = row * channels + c;
                    __m512 value = load_bf16(x + at, 0xFFFF), g = load_bf16(grad_out + at, 0xFFFF);
                    if (with_relu)
                        g = relu_passed(g, value, _mm512_loadu_ps(scale + c), _mm512_loadu_ps(shift + c));
                    __m512 deviation = _mm512_sub_ps(value, _mm512_loadu_ps(mean + c));
                    __m512 centred = _mm512_sub_ps(g, _mm512_loadu_ps(mean_gradient + c));
                    __m512 result = _mm512_fnmadd_ps(deviation, _mm512_loadu_ps(slope + c), centred);
                    store_bf16(grad_x + at, _mm512_mul_ps(result, _mm512_loadu_ps(factor + c)), 0xFFFF);
                }
        }
    }
    free(sums);
    free(constants);
    return failed ? -1 : 0;
}

#else

int vitlab_batch_norm_supported(void) { return 0; }

int vitlab_batch_norm_forward_bf16(const void *x, void *y, const float *weight, const float *bias, float *mean,
                                   float *variance, float *invstd, int64_t rows, int64_t channels, double eps,
                                   int with_relu, int threads) {
    (void)x, (void)y, (void)weight, (void)bias, (void)mean, (void)variance, (void)invstd, (void)rows, (void)channels;
    (void)eps, (void)with_relu, (void)threads;
    abort(); /* callers check vitlab_batch_norm_supported() first */
}

int vitlab_batch_norm_backward_bf16(const void *grad_out, const void *x, const float *mean, const float *invstd,
                                    const float *weight, const float *bias, void *grad_x, float *grad_weight,
                                    float *grad_bias, int64_t rows, int64_t channels, int with_relu, int threads) {
    (void)grad_out, (void)x, (void)mean, (void)invstd, (void)weight, (void)bias, (void)grad_x, (void)grad_weight;
    (void)grad_bias, (void)rows, (void)channels, (void)with_relu, (void)threads;
    abort(); /* callers check vitlab_batch_norm_supported() first */
}

#endif
