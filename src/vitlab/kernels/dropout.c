/* Dropout in one pass, its mask recomputed in backward instead of stored.
 *
 * Element i of a call keeps its value when 15 bits of a counter-based random number are >= `threshold`. The
 * numbers are SplitMix64's (Steele, Lea & Flood 2014, "Fast splittable pseudorandom number generators"; Java's
 * SplittableRandom): word w under the call's 64-bit key is mix(key + (w + 1) · γ), the generator's w-th output
 * when seeded with the key, and each word gives four 16-bit quarters to four elements. A word depends on the key
 * and its index only, never on the thread count, so backward regenerates forward's mask from the key alone.
 *
 * Elements are handled in chunks of LANES words; within a chunk, element quarter * LANES + lane takes quarter
 * `quarter` of word `lane`, so every inner loop runs over LANES neighbouring elements and vectorises.
 */
#include "bf16_math.h"

#define LANES 64
#define CHUNK (4 * LANES)
#define GOLDEN_GAMMA 0x9E3779B97F4A7C15ull
#define PARALLEL_MIN_ELEMENTS 65536

/* SplitMix64's output function. */
static inline uint64_t splitmix64_mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Word `index` of the stream seeded with `key`, for the test against a reference implementation. */
uint64_t vitlab_splitmix64_word(uint64_t key, uint64_t index) {
    return splitmix64_mix(key + (index + 1) * GOLDEN_GAMMA);
}

/* The 15-bit numbers of one chunk (CHUNK of them), in the element order described above; returns how many of the
 * count elements the chunk holds (CHUNK, or fewer in the last one). */
static int64_t chunk_numbers(int64_t chunk, int64_t count, uint64_t key, uint16_t numbers[CHUNK]) {
    uint64_t words[LANES];
    for (int lane = 0; lane < LANES; lane++)
        words[lane] = splitmix64_mix(key + ((uint64_t)chunk * LANES + (uint64_t)lane + 1) * GOLDEN_GAMMA);
    for (int quarter = 0; quarter < 4; quarter++)
        for (int lane = 0; lane < LANES; lane++)
            numbers[quarter * LANES + lane] = (uint16_t)((words[lane] >> (16 * quarter)) & 0x7FFFu);
    return count - chunk * CHUNK < CHUNK ? count - chunk * CHUNK : CHUNK;
}

/* out[i] = inputs[i] * scale where element i is kept, else 0 (bf16 in and out, the product in fp32). */
void vitlab_dropout_bf16(const uint16_t *inputs, uint16_t *out, int64_t count, uint64_t key, uint32_t threshold,
                         float scale, int threads) {
    int64_t chunks = (count + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(threads) schedule(static) if (count >= PARALLEL_MIN_ELEMENTS)
    for (int64_t chunk = 0; chunk < chunks; chunk++) {
        uint16_t numbers[CHUNK];
        int64_t start = chunk * CHUNK, length = chunk_numbers(chunk, count, key, numbers);
        for (int64_t i = 0; i < length; i++) {
            float kept = bf16_to_float(inputs[start + i]) * scale;
            out[start + i] = numbers[i] >= threshold ? float_to_bf16(kept) : 0;
        }
    }
}

/* The same for fp32. */
void vitlab_dropout_f32(const float *inputs, float *out, int64_t count, uint64_t key, uint32_t threshold, float scale,
                        int threads) {
    int64_t chunks = (count + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(threads) schedule(static) if (count >= PARALLEL_MIN_ELEMENTS)
    for (int64_t chunk = 0; chunk < chunks; chunk++) {
        uint16_t numbers[CHUNK];
        int64_t start = chunk * CHUNK, length = chunk_numbers(chunk, count, key, numbers);
        for (int64_t i = 0; i < length; i++)
            out[start + i] = numbers[i] >= threshold ? inputs[start + i] * scale : 0.0f;
    }
}
