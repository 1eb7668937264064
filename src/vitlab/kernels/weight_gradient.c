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
 *
 * On a CPU with AMX (Sapphire Rapids and later) the products run on its tiles instead. oneDNN's own product there
 * reads grad_outᵀ as a transposed view and, inside a training step, ran at about a third of the machine's bf16 rate
 * (docs/performance.md). A tile product sums over 32 numbers of a row of its first operand, so the narrower of
 * grad_out and input is transposed, chunk by chunk, into rows that run along the batch (16 × 16 blocks of pairs
 * transposed in registers), and the wider one interleaved pair by pair as above; the sums (narrower × wider, fp32) stay
 * in memory between chunks and are transposed into grad_weight at the end where input was the narrower.
 *
 * Both versions sum with the dot-product instructions, which count bf16 subnormal inputs (and products below fp32's
 * normal range) as 0; so does the bias gradient, summed as each pair times (1, 1). PyTorch's sums keep them.
 */
#define _DEFAULT_SOURCE /* syscall(), for AMX's permission request (amx.h) */
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "amx.h"
#include "bf16_math.h"

#define CHUNK_PAIRS 64
#define PREFETCH_PAIRS 8
#define TILE_ROWS 4
#define TILE_VECTORS 4
#define MAX_BIAS_VECTORS 256 /* out_features ≤ 4096 with a bias gradient */

#if defined(VITLAB_AVX512) && defined(__AVX512BF16__)
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

#endif

/* The vector version, built where the compiler targets AVX-512 BF16 but no AMX: on Sapphire Rapids `vdpbf16ps` runs
 * well below an FMA's rate and oneDNN's weight gradient on the AMX tiles ran several times faster than this version
 * (docs/performance.md, "The Intel machine's AMX"), so there the tile version further down is built instead, and a
 * library whose compiler did not know AMX leaves the weight gradient to oneDNN on such a CPU (kernels/build.py). */
#if defined(VITLAB_AVX512) && defined(__AVX512BF16__) && !defined(__AMX_BF16__)

int vitlab_weight_gradient_supported(void) { return 1; }
int64_t vitlab_weight_gradient_max_bias_features(void) { return 16 * MAX_BIAS_VECTORS; }
int vitlab_weight_gradient_on_tiles(void) { return 0; }

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
                for (int64_t v = 0; v < bias_vectors; v++) /* each pair times (1, 1) */
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

#elif defined(VITLAB_AVX512) && defined(__AVX512BF16__) && defined(VITLAB_AMX)

#define CHUNK_ROWS 512 /* rows of the batch packed at a time: a multiple of 32 (a tile product's depth) */

int vitlab_weight_gradient_supported(void) { return amx_ready(); }
int vitlab_weight_gradient_on_tiles(void) { return 1; }
/* no limit (the bias sums live in memory): the largest multiple of 16 */
int64_t vitlab_weight_gradient_max_bias_features(void) { return INT64_MAX / 16 * 16; }

/* rows[j] ← column j of the 16 × 16 matrix of 32-bit numbers whose row i is rows[i]. */
static inline void transpose_16x16(__m512i rows[16]) {
    __m512i t[16], lanes[16];
    for (int i = 0; i < 16; i += 2) { /* 128-bit lane L of t[i]: (row i, row i+1) at columns 4L, 4L+1; t[i+1]: 4L+2, 4L+3 */
        t[i] = _mm512_unpacklo_epi32(rows[i], rows[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(rows[i], rows[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { /* lane L of lanes[i + c]: rows i .. i+3 at column 4L + c */
        lanes[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        lanes[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        lanes[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        lanes[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int c = 0; c < 4; c++) {
        /* even: lanes 0 and 2 of rows 0–3 and 4–7 (and of 8–11 and 12–15); odd: lanes 1 and 3 */
        __m512i even_low = _mm512_shuffle_i32x4(lanes[c], lanes[4 + c], 0x88);
        __m512i odd_low = _mm512_shuffle_i32x4(lanes[c], lanes[4 + c], 0xDD);
        __m512i even_high = _mm512_shuffle_i32x4(lanes[8 + c], lanes[12 + c], 0x88);
        __m512i odd_high = _mm512_shuffle_i32x4(lanes[8 + c], lanes[12 + c], 0xDD);
        rows[c] = _mm512_shuffle_i32x4(even_low, even_high, 0x88);
        rows[4 + c] = _mm512_shuffle_i32x4(odd_low, odd_high, 0x88);
        rows[8 + c] = _mm512_shuffle_i32x4(even_low, even_high, 0xDD);
        rows[12 + c] = _mm512_shuffle_i32x4(odd_low, odd_high, 0xDD);
    }
}

/* packed[c][32 g + k] = source[32 g + k][c]: rows [0, count) of a (count × width) bf16 matrix transposed into rows of
 * CHUNK_ROWS numbers, zero from count up to the next multiple of 32. With column_sums (width fp32 numbers) each column's
 * sum is added to it. */
static void pack_transposed(const uint16_t *source, int64_t width, int64_t count, uint16_t *packed, float *column_sums) {
    const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3F80); /* bf16 1.0 */
    for (int64_t c = 0; c < width; c += 16) {
        __m512 sums = _mm512_setzero_ps();
        for (int64_t group = 0; group < count; group += 32) {
            __m512i pairs[16]; /* pairs[p] lane j: (source[group + 2p][c + j], source[group + 2p + 1][c + j]) */
            for (int p = 0; p < 16; p++) {
                int64_t row = group + 2 * p;
                __m256i first = row < count ? _mm256_loadu_si256((const __m256i *)(source + row * width + c)) : _mm256_setzero_si256();
                __m256i second = row + 1 < count ? _mm256_loadu_si256((const __m256i *)(source + (row + 1) * width + c))
                                                 : _mm256_setzero_si256();
                pairs[p] = _mm512_or_si512(_mm512_cvtepu16_epi32(first), _mm512_slli_epi32(_mm512_cvtepu16_epi32(second), 16));
                if (column_sums != NULL) /* each pair times (1, 1) */
                    sums = _mm512_dpbf16_ps(sums, (__m512bh)pairs[p], ones);
            }
            transpose_16x16(pairs); /* pairs[j]: column c + j's 32 numbers */
            for (int j = 0; j < 16; j++)
                _mm512_storeu_si512(packed + (c + j) * CHUNK_ROWS + group, pairs[j]);
        }
        if (column_sums != NULL)
            _mm512_storeu_ps(column_sums + c, _mm512_add_ps(_mm512_loadu_ps(column_sums + c), sums));
    }
}

/* pairs[p][c] = (source[2p][c], source[2p + 1][c]) for the rows [0, count) of a (count × width) bf16 matrix, zero
 * from count up to the next multiple of 32 rows. With column_sums (width fp32 numbers) each column's sum is added. */
static void pack_pairs(const uint16_t *source, int64_t width, int64_t count, uint32_t *pairs, float *column_sums) {
    const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3F80);
    int64_t padded = (count + 31) / 32 * 32;
    for (int64_t row = 0; row < padded; row += 2) {
        uint32_t *target = pairs + row / 2 * width;
        if (row >= count)
            memset(target, 0, sizeof(uint32_t) * (size_t)width);
        else
            interleave_rows(source + row * width, row + 1 < count ? source + (row + 1) * width : NULL, target, width);
    }
    if (column_sums == NULL)
        return;
    for (int64_t c = 0; c < width; c += 16) {
        __m512 sums = _mm512_setzero_ps();
        for (int64_t p = 0; p < padded / 2; p++)
            sums = _mm512_dpbf16_ps(sums, (__m512bh)_mm512_loadu_si512(pairs + p * width + c), ones);
        _mm512_storeu_ps(column_sums + c, _mm512_add_ps(_mm512_loadu_ps(column_sums + c), sums));
    }
}

/* sums (narrow × wide fp32, row-major) += transposed (narrow rows of CHUNK_ROWS bf16) · pairs (wide pairs a row) over
 * `depth` rows of the chunk (a multiple of 32), 2 × 2 tiles of sums at a time. The tiles (configure_tiles(0)): 0–3 the
 * sums of a block (rows 16·r, columns 16·c of it: tile 2r + c); 4 and 5 rows of the transposed operand (16 × 32
 * numbers), 6 and 7 pairs of the other (16 pairs × 16 columns). */
static void add_chunk_on_tiles(float *sums, const uint16_t *transposed, const uint32_t *pairs, int64_t narrow,
                               int64_t wide, int64_t depth) {
    const int64_t sum_bytes = 4 * wide, row_bytes = 2 * CHUNK_ROWS, pair_bytes = 4 * wide;
    __asm__ volatile("" : : : "memory"); /* the tile intrinsics do not tell the compiler what memory they touch */
    for (int64_t i = 0; i < narrow; i += 32) {
        int two_rows = i + 16 < narrow;
        for (int64_t j = 0; j < wide; j += 32) {
            int two_columns = j + 16 < wide;
            float *block = sums + i * wide + j;
            _tile_loadd(0, block, sum_bytes);
            if (two_columns) _tile_loadd(1, block + 16, sum_bytes);
            if (two_rows) _tile_loadd(2, block + 16 * wide, sum_bytes);
            if (two_rows && two_columns) _tile_loadd(3, block + 16 * wide + 16, sum_bytes);
            for (int64_t k = 0; k < depth; k += 32) {
                _tile_loadd(4, transposed + i * CHUNK_ROWS + k, row_bytes);
                _tile_loadd(6, pairs + k / 2 * wide + j, pair_bytes);
                _tile_dpbf16ps(0, 4, 6);
                if (two_columns) { _tile_loadd(7, pairs + k / 2 * wide + j + 16, pair_bytes); _tile_dpbf16ps(1, 4, 7); }
                if (two_rows) { _tile_loadd(5, transposed + (i + 16) * CHUNK_ROWS + k, row_bytes); _tile_dpbf16ps(2, 5, 6); }
                if (two_rows && two_columns) _tile_dpbf16ps(3, 5, 7);
            }
            _tile_stored(0, block, sum_bytes);
            if (two_columns) _tile_stored(1, block + 16, sum_bytes);
            if (two_rows) _tile_stored(2, block + 16 * wide, sum_bytes);
            if (two_rows && two_columns) _tile_stored(3, block + 16 * wide + 16, sum_bytes);
        }
    }
    __asm__ volatile("" : : : "memory");
}

/* As the vector kernel's vitlab_weight_gradient above (the same arguments, outputs and failure), on AMX tiles. */
int vitlab_weight_gradient(const uint16_t *grad_out, const uint16_t *input, float *grad_weight, float *grad_bias,
                           int64_t rows, int64_t outs, int64_t ins, int threads) {
    /* the narrower matrix is transposed: with input the narrower, the sums are grad_weightᵀ */
    int input_transposed = ins < outs;
    const uint16_t *narrow_source = input_transposed ? input : grad_out, *wide_source = input_transposed ? grad_out : input;
    int64_t narrow = input_transposed ? ins : outs, wide = input_transposed ? outs : ins;
    int64_t per_thread = narrow * wide + outs, chunks = (rows + CHUNK_ROWS - 1) / CHUNK_ROWS;
    if (threads < 1)
        threads = 1;
    if (threads > chunks) /* at least a chunk per thread */
        threads = chunks > 0 ? (int)chunks : 1;
    size_t sum_bytes = sizeof(float) * (size_t)(threads * per_thread);
    size_t buffer_bytes = (size_t)CHUNK_ROWS * (sizeof(uint16_t) * (size_t)narrow + sizeof(uint32_t) / 2 * (size_t)wide);
    float *partials = aligned_alloc(64, (sum_bytes + 63) / 64 * 64);
    uint8_t *buffers = aligned_alloc(64, (buffer_bytes * (size_t)threads + 63) / 64 * 64);
    if (partials == NULL || buffers == NULL) {
        free(partials);
        free(buffers);
        return 1;
    }
#pragma omp parallel num_threads(threads)
    {
        int thread = omp_get_thread_num(), team = omp_get_num_threads();
        float *sums = partials + thread * per_thread, *bias_sums = sums + narrow * wide;
        uint16_t *transposed = (uint16_t *)(buffers + thread * buffer_bytes);
        uint32_t *pairs = (uint32_t *)(transposed + narrow * CHUNK_ROWS);
        memset(sums, 0, sizeof(float) * (size_t)per_thread);
        configure_tiles(0);
        for (int64_t chunk = chunks * thread / team; chunk < chunks * (thread + 1) / team; chunk++) {
            int64_t first = chunk * CHUNK_ROWS, count = rows - first < CHUNK_ROWS ? rows - first : CHUNK_ROWS;
            pack_transposed(narrow_source + first * narrow, narrow, count, transposed,
                            grad_bias != NULL && !input_transposed ? bias_sums : NULL);
            pack_pairs(wide_source + first * wide, wide, count, pairs, grad_bias != NULL && input_transposed ? bias_sums : NULL);
            add_chunk_on_tiles(sums, transposed, pairs, narrow, wide, (count + 31) / 32 * 32);
        }
        _tile_release();
#pragma omp barrier
        /* the threads' sums added, each thread a share of grad_weight's 16 × 16 blocks (transposed where the sums are
         * grad_weightᵀ), then of grad_bias's vectors */
        int64_t blocks = (outs / 16) * (ins / 16);
        for (int64_t b = blocks * thread / team; b < blocks * (thread + 1) / team; b++) {
            int64_t o = b / (ins / 16) * 16, i = b % (ins / 16) * 16;
            __m512i block[16];
            for (int r = 0; r < 16; r++) { /* row r of the sums' block: (o + r, i ..) or, transposed, (i + r, o ..) */
                int64_t at = input_transposed ? (i + r) * wide + o : (o + r) * wide + i;
                __m512 total = _mm512_loadu_ps(partials + at);
                for (int other = 1; other < team; other++)
                    total = _mm512_add_ps(total, _mm512_loadu_ps(partials + other * per_thread + at));
                block[r] = _mm512_castps_si512(total);
            }
            if (input_transposed)
                transpose_16x16(block);
            for (int r = 0; r < 16; r++)
                _mm512_storeu_si512(grad_weight + (o + r) * ins + i, block[r]);
        }
        if (grad_bias != NULL)
            for (int64_t v = outs / 16 * thread / team; v < outs / 16 * (thread + 1) / team; v++) {
                __m512 total = _mm512_loadu_ps(partials + narrow * wide + 16 * v);
                for (int other = 1; other < team; other++)
                    total = _mm512_add_ps(total, _mm512_loadu_ps(partials + other * per_thread + narrow * wide + 16 * v));
                _mm512_storeu_ps(grad_bias + 16 * v, total);
            }
    }
    free(partials);
    free(buffers);
    return 0;
}

#else

int vitlab_weight_gradient_supported(void) { return 0; }
int vitlab_weight_gradient_on_tiles(void) { return 0; }
int64_t vitlab_weight_gradient_max_bias_features(void) { return 0; }
int vitlab_weight_gradient(const uint16_t *grad_out, const uint16_t *input, float *grad_weight, float *grad_bias,
                           int64_t rows, int64_t outs, int64_t ins, int threads) {
    (void)grad_out, (void)input, (void)grad_weight, (void)grad_bias, (void)rows, (void)outs, (void)ins, (void)threads;
    return 1;
}

#endif
