/* ReLU followed by a 2×2, stride-2 max-pool, in one pass over channels-last activations, forward and backward; and the
 * same max-pool without the ReLU (`vitlab_max_pool_forward_*`, whose positions the same backward reads).
 *
 * PyTorch makes four passes for the pair: ReLU writes its output, max-pool reads it and writes the maxima and their
 * int64 positions, and backward fills the input gradient with zeros, scatters the output gradient into it and
 * passes it through ReLU's mask (ReLU's output saved for that). Here forward reads x once and writes the maxima and
 * one byte per output naming the window position that won (4 where ReLU stops the gradient); backward writes every
 * input gradient once, from that byte.
 *
 * The result is PyTorch's, value for value: the maximum of ReLU(x) over each window, won by the last position in
 * reading order (top row, then left to right) that is greater than the maximum before it or is NaN (as max_pool2d's
 * CPU kernel: the first of tied maxima, the last of several NaNs), and a gradient that ReLU passes where that
 * maximum is not <= 0 (as threshold_backward). Windows do not overlap, so each input receives at most one output's
 * gradient; an odd last row or column is in no window (gradient 0).
 *
 * Without the ReLU the maximum is max_pool2d's over x itself, by the same rule, and every output passes its gradient.
 *
 * Layout: x is (batch, height, width, channels), bf16 or fp32 (a channels-last NCHW tensor's memory), the output
 * and the positions (batch, height / 2, width / 2, channels).
 */
#include <stdlib.h>
#include <string.h>

#include "bf16_math.h"

#define NO_GRADIENT 4
#define PARALLEL_MIN_ELEMENTS 65536

#ifdef VITLAB_AVX512

int vitlab_relu_max_pool_supported(void) { return 1; }

/* max(0, v) as PyTorch's ReLU: v where v is NaN or -0 (the second operand wins an unordered or equal comparison). */
static inline __m512 relu(__m512 value) { return _mm512_max_ps(_mm512_setzero_ps(), value); }

/* 16 values (those `mask` selects) of a bf16 (size 2) or fp32 (size 4) array, as fp32. */
static inline __m512 load_values(const char *source, int size, __mmask16 mask) {
    return size == 4 ? _mm512_maskz_loadu_ps(mask, source) : load_bf16((const uint16_t *)source, mask);
}

/* The forward for elements of `size` bytes, with the ReLU first or not (inlined four times, so both are constants in
 * each copy). */
static inline __attribute__((always_inline)) void relu_max_pool_forward(const char *x, char *out, uint8_t *position,
                                                                         int64_t batch, int64_t height, int64_t width,
                                                                         int64_t channels, int threads, int size,
                                                                         int with_relu) {
    int64_t out_height = height / 2, out_width = width / 2, rows = batch * out_height, pixel = channels * size;
    const __m512 zero = _mm512_setzero_ps();
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * out_width * channels >= PARALLEL_MIN_ELEMENTS)
    for (int64_t row = 0; row < rows; row++) {
        int64_t item = row / out_height, out_row = row % out_height;
        const char *top = x + (item * height + 2 * out_row) * width * pixel, *bottom = top + width * pixel;
        char *maxima = out + row * out_width * pixel;
        uint8_t *winners = position + row * out_width * channels;
        for (int64_t column = 0; column < out_width; column++)
            for (int64_t c = 0; c < channels; c += 16) {
                __mmask16 mask = tail_mask(channels - c);
                int64_t left = 2 * column * pixel + c * size, right = left + pixel;
                __m512 window[4] = {load_values(top + left, size, mask), load_values(top + right, size, mask),
                                    load_values(bottom + left, size, mask), load_values(bottom + right, size, mask)};
                if (with_relu)
                    for (int k = 0; k < 4; k++)
                        window[k] = relu(window[k]);
                __m512 best = window[0];
                __m512i winner = _mm512_setzero_si512();
                for (int k = 1; k < 4; k++) {
                    __mmask16 takes = _mm512_cmp_ps_mask(window[k], best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(window[k], window[k], _CMP_UNORD_Q);
                    best = _mm512_mask_blend_ps(takes, best, window[k]);
                    winner = _mm512_mask_blend_epi32(takes, winner, _mm512_set1_epi32(k));
                }
                if (with_relu) {
                    __mmask16 stopped = _mm512_cmp_ps_mask(best, zero, _CMP_LE_OQ); /* ReLU's gradient is 0 there */
                    winner = _mm512_mask_blend_epi32(stopped, winner, _mm512_set1_epi32(NO_GRADIENT));
                }
                char *target = maxima + column * pixel + c * size;
                if (size == 4)
                    _mm512_mask_storeu_ps(target, mask, best);
                else
                    store_bf16((uint16_t *)target, best, mask); /* exact: every value is a bf16 number */
                _mm_mask_storeu_epi8(winners + column * channels + c, mask, _mm512_cvtepi32_epi8(winner));
            }
    }
}

/* The backward for elements of `size` bytes. A gradient of -0 is written as +0: PyTorch adds each gradient to the
 * zeros it fills the input gradient with. */
static inline __attribute__((always_inline)) void relu_max_pool_backward(const char *grad_out, const uint8_t *position,
                                                                          char *grad_x, int64_t batch, int64_t height,
                                                                          int64_t width, int64_t channels, int threads, int size) {
    int64_t out_height = height / 2, out_width = width / 2, rows = batch * out_height, pixel = channels * size;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * out_width * channels >= PARALLEL_MIN_ELEMENTS)
    for (int64_t row = 0; row < rows; row++) {
        int64_t item = row / out_height, out_row = row % out_height;
        char *top = grad_x + (item * height + 2 * out_row) * width * pixel, *bottom = top + width * pixel;
        const char *gradients = grad_out + row * out_width * pixel;
        const uint8_t *winners = position + row * out_width * channels;
        for (int64_t column = 0; column < out_width; column++)
            for (int64_t c = 0; c < channels; c += 16) {
                __mmask16 mask = tail_mask(channels - c);
                __m128i winner = _mm_maskz_loadu_epi8(mask, winners + column * channels + c);
                int64_t left = 2 * column * pixel + c * size, right = left + pixel;
                char *targets[4] = {top + left, top + right, bottom + left, bottom + right};
                const char *source = gradients + column * pixel + c * size;
                if (size == 4) {
                    __m512i gradient = _mm512_maskz_loadu_epi32(mask, source);
                    gradient = _mm512_maskz_mov_epi32(_mm512_cmpneq_epi32_mask(gradient, _mm512_set1_epi32((int)0x80000000u)), gradient);
                    for (int k = 0; k < 4; k++) {
                        __mmask16 here = _mm_cmpeq_epi8_mask(winner, _mm_set1_epi8((char)k));
                        _mm512_mask_storeu_epi32(targets[k], mask, _mm512_maskz_mov_epi32(here, gradient));
                    }
                } else {
                    __m256i gradient = _mm256_maskz_loadu_epi16(mask, source);
                    gradient = _mm256_maskz_mov_epi16(_mm256_cmpneq_epi16_mask(gradient, _mm256_set1_epi16((short)0x8000)), gradient);
                    for (int k = 0; k < 4; k++) {
                        __mmask16 here = _mm_cmpeq_epi8_mask(winner, _mm_set1_epi8((char)k));
                        _mm256_mask_storeu_epi16(targets[k], mask, _mm256_maskz_mov_epi16(here, gradient));
                    }
                }
            }
        if (width % 2) { /* the last column is in no window */
            memset(top + (width - 1) * pixel, 0, pixel);
            memset(bottom + (width - 1) * pixel, 0, pixel);
        }
    }
    if (height % 2) /* the last row of each image is in no window */
        for (int64_t item = 0; item < batch; item++)
            memset(grad_x + (item * height + height - 1) * width * pixel, 0, width * pixel);
}

void vitlab_relu_max_pool_forward_bf16(const void *x, void *out, uint8_t *position, int64_t batch, int64_t height,
                                       int64_t width, int64_t channels, int threads) {
    relu_max_pool_forward(x, out, position, batch, height, width, channels, threads, 2, 1);
}

void vitlab_relu_max_pool_forward_f32(const void *x, void *out, uint8_t *position, int64_t batch, int64_t height,
                                      int64_t width, int64_t channels, int threads) {
    relu_max_pool_forward(x, out, position, batch, height, width, channels, threads, 4, 1);
}

void vitlab_max_pool_forward_bf16(const void *x, void *out, uint8_t *position, int64_t batch, int64_t height,
                                  int64_t width, int64_t channels, int threads) {
    relu_max_pool_forward(x, out, position, batch, height, width, channels, threads, 2, 0);
}

void vitlab_max_pool_forward_f32(const void *x, void *out, uint8_t *position, int64_t batch, int64_t height,
                                 int64_t width, int64_t channels, int threads) {
    relu_max_pool_forward(x, out, position, batch, height, width, channels, threads, 4, 0);
}

void vitlab_relu_max_pool_backward_bf16(const void *grad_out, const uint8_t *position, void *grad_x, int64_t batch,
                                        int64_t height, int64_t width, int64_t channels, int threads) {
    relu_max_pool_backward(grad_out, position, grad_x, batch, height, width, channels, threads, 2);
}

void vitlab_relu_max_pool_backward_f32(const void *grad_out, const uint8_t *position, void *grad_x, int64_t batch,
                                       int64_t height, int64_t width, int64_t channels, int threads) {
    relu_max_pool_backward(grad_out, position, grad_x, batch, height, width, channels, threads, 4);
}

#else

int vitlab_relu_max_pool_supported(void) { return 0; }

#define UNSUPPORTED(name, first, second, third)                                                                        \
    void name(first a, second b, third c, int64_t batch, int64_t height, int64_t width, int64_t channels, int threads) { \
        (void)a, (void)b, (void)c, (void)batch, (void)height, (void)width, (void)channels, (void)threads;               \
        abort(); /* callers check vitlab_relu_max_pool_supported() first */                                          \
    }
UNSUPPORTED(vitlab_relu_max_pool_forward_bf16, const void *, void *, uint8_t *)
UNSUPPORTED(vitlab_relu_max_pool_forward_f32, const void *, void *, uint8_t *)
UNSUPPORTED(vitlab_max_pool_forward_bf16, const void *, void *, uint8_t *)
UNSUPPORTED(vitlab_max_pool_forward_f32, const void *, void *, uint8_t *)
UNSUPPORTED(vitlab_relu_max_pool_backward_bf16, const void *, const uint8_t *, void *)
UNSUPPORTED(vitlab_relu_max_pool_backward_f32, const void *, const uint8_t *, void *)

#endif
