/* ReLU followed by a 2×2, stride-2 max-pool, in one pass over channels-last bf16 activations, forward and backward.
 *
 * PyTorch makes four passes for the pair: ReLU writes its output, max-pool reads it and writes the maxima and their
 * int64 positions, and backward fills the input gradient with zeros, scatters the output gradient into it and
 * passes it through ReLU's mask (ReLU's output saved for that). Here forward reads x once and writes the maxima and
 * one byte per output naming the window position that won (4 where ReLU stops the gradient); backward writes every
 * input gradient once, from that byte.
 *
 * The result is PyTorch's, value for value: the maximum of ReLU(x) over each window, the first position in reading
 * order (top row, then left to right) that is greater than those before it or NaN (as max_pool2d's CPU kernel),
 * and a gradient that ReLU passes where that maximum is not <= 0 (as threshold_backward). Windows do not overlap,
 * so each input receives at most one output's gradient; an odd last row or column is in no window (gradient 0).
 *
 * Layout: x is (batch, height, width, channels) bf16 (a channels-last NCHW tensor's memory), the output and the
 * positions (batch, height / 2, width / 2, channels).
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

void vitlab_relu_max_pool_forward(const uint16_t *x, uint16_t *out, uint8_t *position, int64_t batch, int64_t height,
                                  int64_t width, int64_t channels, int threads) {
    int64_t out_height = height / 2, out_width = width / 2, rows = batch * out_height;
    const __m512 zero = _mm512_setzero_ps();
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * out_width * channels >= PARALLEL_MIN_ELEMENTS)
    for (int64_t row = 0; row < rows; row++) {
        int64_t item = row / out_height, out_row = row % out_height;
        const uint16_t *top = x + ((item * height + 2 * out_row) * width) * channels, *bottom = top + width * channels;
        uint16_t *maxima = out + row * out_width * channels;
        uint8_t *winners = position + row * out_width * channels;
        for (int64_t column = 0; column < out_width; column++)
            for (int64_t c = 0; c < channels; c += 16) {
                __mmask16 mask = tail_mask(channels - c);
                int64_t left = 2 * column * channels + c, right = left + channels;
                __m512 window[4] = {relu(load_bf16(top + left, mask)), relu(load_bf16(top + right, mask)),
                                    relu(load_bf16(bottom + left, mask)), relu(load_bf16(bottom + right, mask))};
                __m512 best = window[0];
                __m512i winner = _mm512_setzero_si512();
                for (int k = 1; k < 4; k++) {
                    __mmask16 takes = _mm512_cmp_ps_mask(window[k], best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(window[k], window[k], _CMP_UNORD_Q);
                    best = _mm512_mask_blend_ps(takes, best, window[k]);
                    winner = _mm512_mask_blend_epi32(takes, winner, _mm512_set1_epi32(k));
                }
                __mmask16 stopped = _mm512_cmp_ps_mask(best, zero, _CMP_LE_OQ); /* ReLU's gradient is 0 there */
                winner = _mm512_mask_blend_epi32(stopped, winner, _mm512_set1_epi32(NO_GRADIENT));
                store_bf16(maxima + column * channels + c, best, mask); /* exact: every value is a bf16 number */
                _mm_mask_storeu_epi8(winners + column * channels + c, mask, _mm512_cvtepi32_epi8(winner));
            }
    }
}

void vitlab_relu_max_pool_backward(const uint16_t *grad_out, const uint8_t *position, uint16_t *grad_x, int64_t batch,
                                   int64_t height, int64_t width, int64_t channels, int threads) {
    int64_t out_height = height / 2, out_width = width / 2, rows = batch * out_height;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * out_width * channels >= PARALLEL_MIN_ELEMENTS)
    for (int64_t row = 0; row < rows; row++) {
        int64_t item = row / out_height, out_row = row % out_height;
        uint16_t *top = grad_x + ((item * height + 2 * out_row) * width) * channels, *bottom = top + width * channels;
        const uint16_t *gradients = grad_out + row * out_width * channels;
        const uint8_t *winners = position + row * out_width * channels;
        for (int64_t column = 0; column < out_width; column++)
            for (int64_t c = 0; c < channels; c += 16) {
                __mmask16 mask = tail_mask(channels - c);
                __m256i gradient = _mm256_maskz_loadu_epi16(mask, gradients + column * channels + c);
                /* -0 as +0: PyTorch adds each gradient to the zeros it fills the input gradient with */
                gradient = _mm256_maskz_mov_epi16(_mm256_cmpneq_epi16_mask(gradient, _mm256_set1_epi16((short)0x8000)), gradient);
                __m128i winner = _mm_maskz_loadu_epi8(mask, winners + column * channels + c);
                int64_t left = 2 * column * channels + c, right = left + channels;
                uint16_t *targets[4] = {top + left, top + right, bottom + left, bottom + right};
                for (int k = 0; k < 4; k++) {
                    __mmask16 here = _mm_cmpeq_epi8_mask(winner, _mm_set1_epi8((char)k));
                    _mm256_mask_storeu_epi16(targets[k], mask, _mm256_maskz_mov_epi16(here, gradient));
                }
            }
        if (width % 2) { /* the last column is in no window */
            memset(top + (width - 1) * channels, 0, channels * sizeof(uint16_t));
            memset(bottom + (width - 1) * channels, 0, channels * sizeof(uint16_t));
        }
    }
    if (height % 2) /* the last row of each image is in no window */
        for (int64_t item = 0; item < batch; item++)
            memset(grad_x + ((item * height + height - 1) * width) * channels, 0, width * channels * sizeof(uint16_t));
}

#else

int vitlab_relu_max_pool_supported(void) { return 0; }

void vitlab_relu_max_pool_forward(const uint16_t *x, uint16_t *out, uint8_t *position, int64_t batch, int64_t height,
                                  int64_t width, int64_t channels, int threads) {
    (void)x, (void)out, (void)position, (void)batch, (void)height, (void)width, (void)channels, (void)threads;
    abort(); /* callers check vitlab_relu_max_pool_supported() first */
}

void vitlab_relu_max_pool_backward(const uint16_t *grad_out, const uint8_t *position, uint16_t *grad_x, int64_t batch,
                                   int64_t height, int64_t width, int64_t channels, int threads) {
    (void)grad_out, (void)position, (void)grad_x, (void)batch, (void)height, (void)width, (void)channels, (void)threads;
    abort();
}

#endif
