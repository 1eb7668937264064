/* Images cut into patches in one pass: shifted patch tokenization's five views (Lee et al. 2021; models/vit.py,
 * ShiftedPatchTokenizer), and the plain patch embedding's patches rounded to bf16 (PatchEmbedding.project_patches).
 *
 * The tokenizer stacks the image and four copies moved diagonally by `shift` pixels, cuts the stack into P × P
 * patches and lays each patch's values out as (view, channel, row, column). PyTorch's route pads the image, takes the
 * five views and stacks their permuted patches into that layout: a copy whose innermost runs are P numbers long,
 * which ran far below the machine's copy bandwidth (docs/performance.md). Here each output row (one patch) is written
 * in order, read straight from the image, with zeros outside it as the padding gives. Plain C: no vector extension
 * needed.
 */
#include <stdint.h>
#include <string.h>

#include "bf16_math.h"

#define VIEWS 5

/* The views' moves (dy, dx): view k shows pixel (y + dy, x + dx) of the image at (y, x). */
static const int64_t MOVES[VIEWS][2] = {{0, 0}, {-1, -1}, {-1, 1}, {1, -1}, {1, 1}};

/* patches[b, gy · GW + gx, k, c, r, q] = images[b, c, gy · P + r + dy_k · shift, gx · P + q + dx_k · shift], 0 where
 * that pixel is outside the image; GW = width / P. images (count, channels, height, width) fp32 contiguous, height and
 * width multiples of P; patches (count, (height / P) · (width / P), 5 · channels · P · P) fp32. */
/* The `patch` numbers of an image row from column x0 on into target, 0 outside columns [0, width). */
static inline void copy_columns(float *target, const float *row, int64_t x0, int64_t patch, int64_t width) {
    if (x0 >= 0 && x0 + patch <= width) {
        if (patch == 4) /* a size the compiler knows: one 16-byte move, not a call */
            memcpy(target, row + x0, sizeof(float) * 4);
        else
            memcpy(target, row + x0, sizeof(float) * (size_t)patch);
        return;
    }
    for (int64_t q = 0; q < patch; q++)
        target[q] = x0 + q >= 0 && x0 + q < width ? row[x0 + q] : 0.0f;
}

void vitlab_shifted_patches(const float *images, float *patches, int64_t count, int64_t channels, int64_t height,
                            int64_t width, int64_t patch, int64_t shift, int threads) {
    int64_t grid_height = height / patch, grid_width = width / patch, row_values = VIEWS * channels * patch * patch;
    /* One row of the grid at a time (its patches' rows, some kilobytes, stay in the cache while they fill); each
     * image row is read once per view, across the grid's columns. */
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (int64_t b = 0; b < count; b++)
        for (int64_t gy = 0; gy < grid_height; gy++) {
            float *grid_row = patches + (b * grid_height + gy) * grid_width * row_values;
            for (int k = 0; k < VIEWS; k++)
                for (int64_t c = 0; c < channels; c++)
                    for (int64_t r = 0; r < patch; r++) {
                        float *target = grid_row + ((k * channels + c) * patch + r) * patch;
                        int64_t y = gy * patch + r + MOVES[k][0] * shift;
                        if (y < 0 || y >= height) {
                            for (int64_t gx = 0; gx < grid_width; gx++)
                                memset(target + gx * row_values, 0, sizeof(float) * (size_t)patch);
                            continue;
                        }
                        const float *row = images + ((b * channels + c) * height + y) * width;
                        for (int64_t gx = 0; gx < grid_width; gx++)
                            copy_columns(target + gx * row_values, row, gx * patch + MOVES[k][1] * shift, patch, width);
                    }
        }
}

/* The plain patch embedding's cut: patches[b, gy · GW + gx, c, r, q] = bf16(images[b, c, gy · P + r, gx · P + q]),
 * rounded to nearest even as PyTorch's cast to bf16 (a NaN stays a NaN). images (count, channels, height, width) fp32
 * contiguous, height and width multiples of P; patches (count, (height / P) · (width / P), channels · P · P) bf16.
 * PyTorch's route (a cast, then a copy of the permuted view whose innermost runs are P numbers long) ran at a small
 * share of the machine's copy bandwidth. Here each image row is rounded once into a buffer on the stack and its P-wide
 * pieces copied to their patches. Returns 0, or 1 (nothing written) for rows wider than the buffer. */
#define MAX_ROW 4096

int vitlab_patches_bf16(const float *images, uint16_t *patches, int64_t count, int64_t channels, int64_t height,
                        int64_t width, int64_t patch, int threads) {
    if (width > MAX_ROW)
        return 1;
    int64_t grid_height = height / patch, grid_width = width / patch, row_values = channels * patch * patch;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (int64_t b = 0; b < count; b++)
        for (int64_t gy = 0; gy < grid_height; gy++) {
            uint16_t rounded[MAX_ROW];
            uint16_t *grid_row = patches + (b * grid_height + gy) * grid_width * row_values;
            for (int64_t c = 0; c < channels; c++)
                for (int64_t r = 0; r < patch; r++) {
                    const float *row = images + ((b * channels + c) * height + gy * patch + r) * width;
#ifdef VITLAB_AVX512
                    for (int64_t x = 0; x < width; x += 16) {
                        __mmask16 mask = tail_mask(width - x);
                        store_bf16(rounded + x, _mm512_maskz_loadu_ps(mask, row + x), mask);
                    }
#else
                    for (int64_t x = 0; x < width; x++)
                        rounded[x] = float_to_bf16(row[x]);
#endif
                    uint16_t *target = grid_row + (c * patch + r) * patch;
                    if (patch == 4) /* a size the compiler knows: one 8-byte move, not a call */
                        for (int64_t gx = 0; gx < grid_width; gx++)
                            memcpy(target + gx * row_values, rounded + gx * 4, sizeof(uint16_t) * 4);
                    else
                        for (int64_t gx = 0; gx < grid_width; gx++)
                            memcpy(target + gx * row_values, rounded + gx * patch, sizeof(uint16_t) * (size_t)patch);
                }
        }
    return 0;
}

int64_t vitlab_patches_max_width(void) { return MAX_ROW; }
