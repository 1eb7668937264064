/* A training batch's random crop, horizontal flip and normalisation in one pass over its uint8 images.
 *
 * PyTorch's route (data.py: apply_crop_flip, then normalize) pads the batch, picks each image's window with an
 * advanced index over an unfolded view, mirrors the flipped ones with `where`, makes the layout contiguous and converts
 * to float, multiplies and adds: five passes, the index one element at a time. Here each output row is read straight
 * from its source image (zero outside it, as the zero padding gives), reversed if the image is flipped, and written
 * normalised: u · scale[c] + shift[c] in fp32, the product rounded before the sum as PyTorch's `mul_` then `add_` round
 * (this file is compiled as ISO C, so the compiler does not fuse them into one multiply-add). Plain C: no
 * vector extension needed.
 */
#include <stdint.h>
#include <stdlib.h>

#define MAX_WIDTH 4096

/* out[b, c, y, x] = u · scale[c] + shift[c] with u = images[index[b], c, y + offsets[b] − padding, x' + offsets[count + b]
 * − padding], x' = width − 1 − x where flips[b] is not 0 (else x), and u = 0 outside the image. images (N, C, H, W)
 * uint8 contiguous; offsets (2, count): row then column offsets in [0, 2 · padding]; out at out + b · strides[0] +
 * c · strides[1] + y · strides[2] + x · strides[3] (contiguous or channels-last). width at most MAX_WIDTH. */
void vitlab_crop_flip_normalize(const uint8_t *images, const int64_t *index, const int64_t *offsets, const uint8_t *flips,
                                int64_t count, int64_t channels, int64_t height, int64_t width, int64_t padding,
                                const float *scale, const float *shift, float *out, const int64_t *strides, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (int64_t b = 0; b < count; b++)
        for (int64_t c = 0; c < channels; c++) {
            const uint8_t *plane = images + (index[b] * channels + c) * height * width;
            int64_t row_shift = offsets[b] - padding, column_shift = offsets[count + b] - padding;
            float multiplier = scale[c], offset = shift[c];
            uint8_t values[MAX_WIDTH];
            for (int64_t y = 0; y < height; y++) {
                int64_t source_y = y + row_shift;
                for (int64_t x = 0; x < width; x++) {
                    int64_t source_x = (flips[b] ? width - 1 - x : x) + column_shift;
                    int inside = source_y >= 0 && source_y < height && source_x >= 0 && source_x < width;
                    values[x] = inside ? plane[source_y * width + source_x] : 0;
                }
                float *target = out + b * strides[0] + c * strides[1] + y * strides[2];
                if (strides[3] == 1) {
                    for (int64_t x = 0; x < width; x++) {
                        float product = (float)values[x] * multiplier;
                        target[x] = product + offset;
                    }
                } else {
                    for (int64_t x = 0; x < width; x++) {
                        float product = (float)values[x] * multiplier;
                        target[x * strides[3]] = product + offset;
                    }
                }
            }
        }
}

int64_t vitlab_crop_flip_max_width(void) { return MAX_WIDTH; }
