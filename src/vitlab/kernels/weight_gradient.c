/* A linear layer's weight gradient from bf16 activations, in fp32, with its bias gradient from the same pass.
 *
 * grad_weight[o][i] = Σ_k grad_out[k][o] · input[k][i] and grad_bias[o] = Σ_k grad_out[k][o], over the k rows of a
 * batch's tokens. PyTorch computes the first as a matmul of grad_outᵀ (a transposed view) with input, for which
 * oneDNN copies grad_out into transposed blocks and input into pairs of rows, then rounds the product to bf16, which
 * autocast's backward casts to fp32 in another pass; the bias gradient is a separate sum.
 *
 * Here each thread takes its share of the rows in chunks of CHUNK_PAIRS row pairs. A chunk is first interleaved row
 * pair by row pair (grad_out and input alike: (x[2p][c], x[2p+1][c]) side by side, what `vdpbf16ps` multiplies),
 * summing grad_out's pairs into the bias gradient on the way; then every tile of TILE_ROWS outputs × up to
 * TILE_VECTORS·16 inputs adds the chunk's products to the thread's fp32 sums. Thread 0 sums into the outputs, the
 * others into their own buffers, added to the outputs at the end. Nothing is rounded to bf16.
 */
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "bf16_math.h"

#define CHUNK_PAIRS 64
#define PREFETCH_PAIRS 8
#define TILE_ROWS 4
#define TILE_VECTORS 4
#define MAX_BIAS_VECTORS 256 /* out_features ≤ 4096 with a bias gradient */

/* Built where the CPU has AVX-512 BF16 but no AMX: on Sapphire Rapids `vdpbf16ps` runs well below an FMA's rate and
 * oneDNN's weight gradient on the AMX tiles ran several times faster than this kernel, so there it stays with oneDNN
 * (docs/performance.md, "The Intel machine's AMX"). */
#if defined(VITLAB_AVX512) && defined(__AVX512BF16__) && !defined(__AMX_BF16__)

int vitlab_weight_gradient_supported(void) { return 1; }
int64_t vitlab_weight_gradient_max_bias_features(void) { return 16 * MAX_BIAS_VECTORS; }

/* first and second (count bf16 each, a multiple of 16; second NULL: zeros) → pairs[c] = (first[c], second[c]). */
static void interleave_rows(const uint16_t *first, const uint16_t *second, uint32_t *pairs, int64_t count) {
    const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                         39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i high = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24,
                                          55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
    int64_t c = 0;
    for (; c + 32 <= count; c += 32) {
        __m512i a = _mm512_loadu_si512(first + c), b = second ? _mm512_loadu_si512(second + c) : _mm512_setzero_si512();
        _mm512_storeu_si512(pairs + c, _mm512_permutex2var_epi16(a, low, b));
        _mm512_storeu_si512(pairs + c + 16, _mm512_permutex2var_epi16(a, high, b));
    }
    if (c < count) { /* 16 left */
        __m512i a = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(first + c)));
        __m512i b = second ? _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(second + c))) : _mm512_setzero_si512();
        _mm512_storeu_si512(pairs + c, _mm512_permutex2var_epi16(a, low, b));
    }
}

/* sums[r][16v + lane] (rows `ins` apart) += Σ_p out_pairs[p][r] · in_pairs[p][16v + lane], r < ROWS, v < VECTORS;
 * out_pairs rows are `outs` pairs long, in_pairs rows `ins`. ROWS and VECTORS are constants at every call. */
static inline __attribute__((always_inline)) void add_tile(const int ROWS, const int VECTORS, float *sums, int64_t ins,
                                                            const uint32_t *out_pairs, int64_t outs, const uint32_t *in_pairs,
                                                            int64_t count) {
    __m512 acc[TILE_ROWS][TILE_VECTORS];
    for (int r = 0; r < ROWS; r++)
        for (int v = 0; v < VECTORS; v++) acc[r][v] = _mm512_loadu_ps(sums + r * ins + 16 * v);
    for (int64_t p = 0; p < count; p++) {
        __m512bh columns[TILE_VECTORS];
        for (int v = 0; v < VECTORS; v++) columns[v] = (__m512bh)_mm512_loadu_si512(in_pairs + p * ins + 16 * v);
        for (int r = 0; r < ROWS; r++) {
            __m512bh pair = (__m512bh)_mm512_set1_epi32((int)out_pairs[p * outs + r]);
            for (int v = 0; v < VECTORS; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], pair, columns[v]);
        }
    }
    for (int r = 0; r < ROWS; r++)
        for (int v = 0; v < VECTORS; v++) _mm512_storeu_ps(sums + r * ins + 16 * v, acc[r][v]);
}

/* Every tile of rows [o, o + ROWS) of the sums, across all `ins` columns (a multiple of 16). */
static inline __attribute__((always_inline)) void add_row_tiles(const int ROWS, float *sums, int64_t ins,
                                                                 const uint32_t *out_pairs, int64_t outs,
                                                                 const uint32_t *in_pairs, int64_t count) {
    int64_t i = 0;
    for (; i + 16 * TILE_VECTORS <= ins; i += 16 * TILE_VECTORS)
        add_tile(ROWS, TILE_VECTORS, sums + i, ins, out_pairs, outs, in_pairs + i, count);
    switch ((ins - i) / 16) {
    case 3: add_tile(ROWS, 3, sums + i, ins, out_pairs, outs, in_pairs + i, count); break;
    case 2: add_tile(ROWS, 2, sums + i, ins, out_pairs, outs, in_pairs + i, count); break;
    case 1: add_tile(ROWS, 1, sums + i, ins, out_pairs, outs, in_pairs + i, count); break;
    default: break;
    }
}

/* grad_out (rows × outs) and input (rows × ins), bf16, row-major; outs and ins multiples of 16 (outs ≤
 * 16·MAX_BIAS_VECTORS when grad_bias is given) → grad_weight (outs × ins) and grad_bias (outs, or NULL), fp32.
 * Returns 1 when its buffers could not be allocated (the outputs are then unset), else 0. */
int vitlab_weight_gradient(const uint16_t *grad_out, const uint16_t *input, float *grad_weight, float *grad_bias,
                           int64_t rows, int64_t outs, int64_t ins, int threads) {
    int64_t pairs = (rows + 1) / 2, per_output = outs * ins + outs;
    if (threads < 1)
        threads = 1;
    if (threads > pairs / CHUNK_PAIRS + 1) /* at least a chunk per thread */
        threads = (int)(pairs / CHUNK_PAIRS + 1);
    float *partials = threads > 1 ? malloc(sizeof(float) * (size_t)(threads - 1) * (size_t)per_output) : NULL;
    uint32_t *chunks = malloc(sizeof(uint32_t) * (size_t)threads * CHUNK_PAIRS * (size_t)(outs + ins));
    if ((threads > 1 && partials == NULL) || chunks == NULL) {
        free(partials);
        free(chunks);
        return 1;
    }
    const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3F80); /* bf16 1.0 */
#pragma omp parallel num_threads(threads)
    {
        int thread = omp_get_thread_num(), team = omp_get_num_threads();
        float *sums = thread == 0 ? grad_weight : partials + (int64_t)(thread - 1) * per_output;
        float *bias_sums = thread == 0 ? grad_bias : sums + outs * ins;
        uint32_t *out_pairs = chunks + (int64_t)thread * CHUNK_PAIRS * (outs + ins), *in_pairs = out_pairs + CHUNK_PAIRS * outs;
        int64_t bias_vectors = grad_bias == NULL ? 0 : outs / 16;
        __m512 bias_acc[MAX_BIAS_VECTORS];
        for (int64_t v = 0; v < bias_vectors; v++)
            bias_acc[v] = _mm512_setzero_ps();
        memset(sums, 0, sizeof(float) * (size_t)(outs * ins));
        int64_t first = pairs * thread / team, last = pairs * (thread + 1) / team;
        for (int64_t chunk = first; chunk < last; chunk += CHUNK_PAIRS) {
            int64_t count = last - chunk < CHUNK_PAIRS ? last - chunk : CHUNK_PAIRS;
            for (int64_t p = 0; p < count; p++) {
                int64_t row = 2 * (chunk + p);
                int paired = row + 1 < rows;
                if (row + 2 * PREFETCH_PAIRS + 1 < rows) { /* rows a few pairs on, fetched while these are interleaved */
                    const char *ahead_out = (const char *)(grad_out + (row + 2 * PREFETCH_PAIRS) * outs);
                    const char *ahead_in = (const char *)(input + (row + 2 * PREFETCH_PAIRS) * ins);
                    for (int64_t byte = 0; byte < 4 * outs; byte += 64) /* two rows of outs bf16 numbers */
                        _mm_prefetch(ahead_out + byte, _MM_HINT_T0);
                    for (int64_t byte = 0; byte < 4 * ins; byte += 64)
                        _mm_prefetch(ahead_in + byte, _MM_HINT_T0);
                }
                interleave_rows(grad_out + row * outs, paired ? grad_out + (row + 1) * outs : NULL, out_pairs + p * outs, outs);
                interleave_rows(input + row * ins, paired ? input + (row + 1) * ins : NULL, in_pairs + p * ins, ins);
                for (int64_t v = 0; v < bias_vectors; v++) /* each pair times (1, 1): exact in fp32 */
                    bias_acc[v] = _mm512_dpbf16_ps(bias_acc[v], (__m512bh)_mm512_loadu_si512(out_pairs + p * outs + 16 * v), ones);
            }
            int64_t o = 0;
            for (; o + TILE_ROWS <= outs; o += TILE_ROWS)
                add_row_tiles(TILE_ROWS, sums + o * ins, ins, out_pairs + o, outs, in_pairs, count);
            /* outs is a multiple of 16, TILE_ROWS divides 16: no rows left */
        }
        for (int64_t v = 0; v < bias_vectors; v++)
            _mm512_storeu_ps(bias_sums + 16 * v, bias_acc[v]);
#pragma omp barrier
        /* the other threads' sums into thread 0's (the outputs), each thread a share of the numbers */
        int64_t total = outs * ins + (grad_bias == NULL ? 0 : outs); /* a multiple of 16 */
        int64_t from = total / 16 * thread / team * 16, to = total / 16 * (thread + 1) / team * 16;
        for (int64_t e = from; e < to; e += 16) {
            float *target = e < outs * ins ? grad_weight + e : grad_bias + (e - outs * ins);
            __m512 sum = _mm512_loadu_ps(target);
            for (int other = 1; other < team; other++)
                sum = _mm512_add_ps(sum, _mm512_loadu_ps(partials + (int64_t)(other - 1) * per_output + e));
            _mm512_storeu_ps(target, sum);
        }
    }
    free(partials);
    free(chunks);
    return 0;
}

#else

int vitlab_weight_gradient_supported(void) { return 0; }
int64_t vitlab_weight_gradient_max_bias_features(void) { return 0; }
int vitlab_weight_gradient(const uint16_t *grad_out, const uint16_t *input, float *grad_weight, float *grad_bias,
                           int64_t rows, int64_t outs, int64_t ins, int threads) {
    (void)grad_out, (void)input, (void)grad_weight, (void)grad_bias, (void)rows, (void)outs, (void)ins, (void)threads;
    return 1;
}

#endif
