/* A linear layer's forward and input-gradient products in bf16: out = a · B (+ bias), B a small matrix (a layer's
 * weight or its transpose) packed once per call.
 *
 * PyTorch's bf16 matmuls go to oneDNN, which ran the ViTs' narrow shapes (64 to 512 features, thousands of token
 * rows) well below the machine's bf16 peak: a layer with 64 outputs and 256 inputs at about 70% of it, and every call
 * pays a fixed cost of tens of microseconds (docs/performance.md). Here `vdpbf16ps` multiplies pairs along the sum:
 * a row of a (row-major, its depth axis contiguous) already holds its pairs side by side, so each is broadcast
 * straight from memory; B is packed as pairs[p][w] = (B[2p][w], B[2p+1][w]). Every tile of TILE_ROWS rows × up to
 * TILE_VECTORS·16 outputs keeps its sums in registers through the whole depth.
 *
 * Numerics: each output is one fp32 sum over the depth, pair by pair in order, then (plus the bias, a bf16 number)
 * rounded to bf16 once — the same bits as oneDNN's product for these shapes (tests/kernels/test_matmul_kernel.py).
 *
 * An MLP's first layer can end in its GELU instead (vitlab_matmul_gelu): each tile rounds its sums to bf16, adds the
 * layer's fp32 bias and writes GELU and GELU' as gelu.c does, so the layer's own output is never written or read back.
 */
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "bf16_math.h"

#define TILE_ROWS 6
#define TILE_VECTORS 4

#if defined(VITLAB_AVX512) && defined(__AVX512BF16__)

int vitlab_matmul_supported(void) { return 1; }

/* weight (outs × ins, bf16, row-major; outs and ins even) → forward_pairs (ins/2 × outs), the pairs of weightᵀ for
 * x · weightᵀ, and backward_pairs (outs/2 × ins, or NULL: not wanted), the pairs of weight for grad_out · weight. */
void vitlab_pack_linear_weight(const uint16_t *weight, uint32_t *forward_pairs, uint32_t *backward_pairs, int64_t outs, int64_t ins) {
    for (int64_t o = 0; o < outs; o++)
        for (int64_t p = 0; p < ins / 2; p++) {
            uint32_t pair;
            memcpy(&pair, weight + o * ins + 2 * p, sizeof pair);
            forward_pairs[p * outs + o] = pair;
        }
    if (backward_pairs == NULL)
        return;
    for (int64_t p = 0; p < outs / 2; p++)
        for (int64_t i = 0; i < ins; i++)
            backward_pairs[p * ins + i] = (uint32_t)weight[2 * p * ins + i] | (uint32_t)weight[(2 * p + 1) * ins + i] << 16;
}

/* What a tile does with its fp32 sums: PLAIN rounds them (plus a bf16 bias) to bf16; GELU rounds them to bf16 (the
 * matmul's output), adds an fp32 bias and writes GELU and GELU' of that: the same bits as the matmul and then gelu.c's
 * forward. (Backward's product through the GELU's derivative, done the same way, ran slower than the matmul and then
 * gelu.c's backward: docs/performance.md.) */
enum { PLAIN, GELU };

/* The tile's side inputs and outputs, each at the tile's first row and column; rows `width` apart. */
typedef struct {
    const uint16_t *bias_bf16; /* PLAIN: width bf16 numbers, or NULL */
    const float *bias;         /* GELU: width fp32 numbers */
    uint16_t *derivative;      /* GELU: rows × width bf16 */
} Epilogue;

/* The bf16 rounding of 16 fp32 numbers, as fp32 again (what a store and a load of them would give). */
static inline __m512 rounded_to_bf16(__m512 values) {
    __m256i bits = (__m256i)_mm512_cvtneps_pbh(values);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

/* out[r][16v + lane] = Σ_p a[r] pair p · pairs[p][16v + lane], then the epilogue, r < ROWS, v < VECTORS; a's rows
 * `depth` long, out's and pairs' rows `width`. ROWS, VECTORS and MODE are constants at every call. */
static inline __attribute__((always_inline)) void product_tile(const int ROWS, const int VECTORS, const int MODE, const uint16_t *a,
                                                                int64_t depth, const uint32_t *pairs, int64_t width,
                                                                Epilogue epilogue, uint16_t *out) {
    __m512 sums[TILE_ROWS][TILE_VECTORS];
    for (int r = 0; r < ROWS; r++)
        for (int v = 0; v < VECTORS; v++)
            sums[r][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < depth / 2; p++) {
        __m512bh columns[TILE_VECTORS];
        for (int v = 0; v < VECTORS; v++)
            columns[v] = (__m512bh)_mm512_loadu_si512(pairs + p * width + 16 * v);
        for (int r = 0; r < ROWS; r++) {
            uint32_t pair;
            memcpy(&pair, a + r * depth + 2 * p, sizeof pair);
            __m512bh row_pair = (__m512bh)_mm512_set1_epi32((int)pair);
            for (int v = 0; v < VECTORS; v++)
                sums[r][v] = _mm512_dpbf16_ps(sums[r][v], row_pair, columns[v]);
        }
    }
    for (int v = 0; v < VECTORS; v++) {
        if (MODE == PLAIN) {
            __m512 shift = epilogue.bias_bf16 == NULL ? _mm512_setzero_ps() : load_bf16(epilogue.bias_bf16 + 16 * v, 0xFFFF);
            for (int r = 0; r < ROWS; r++)
                store_bf16_rounded(out + r * width + 16 * v,
                                   epilogue.bias_bf16 == NULL ? sums[r][v] : _mm512_add_ps(sums[r][v], shift), 0xFFFF);
        } else {
            __m512 bias = _mm512_loadu_ps(epilogue.bias + 16 * v);
            for (int r = 0; r < ROWS; r++) {
                __m512 gelu, slope;
                gelu_and_derivative(_mm512_add_ps(rounded_to_bf16(sums[r][v]), bias), &gelu, &slope);
                store_bf16_rounded(out + r * width + 16 * v, gelu, 0xFFFF);
                store_bf16_rounded(epilogue.derivative + r * width + 16 * v, slope, 0xFFFF);
            }
        }
    }
}

/* The epilogue's pointers moved `rows` rows and `columns` columns on (rows `width` apart). */
static inline Epilogue moved(Epilogue epilogue, int64_t rows, int64_t columns, int64_t width) {
    Epilogue at = epilogue;
    if (at.bias_bf16 != NULL)
        at.bias_bf16 += columns;
    if (at.bias != NULL)
        at.bias += columns;
    if (at.derivative != NULL)
        at.derivative += rows * width + columns;
    return at;
}

/* ROWS rows of a times all of B, TILE_VECTORS·16 outputs at a time (width a multiple of 16). */
static inline __attribute__((always_inline)) void product_rows(const int ROWS, const int MODE, const uint16_t *a, int64_t depth,
                                                                const uint32_t *pairs, int64_t width, Epilogue epilogue, uint16_t *out) {
    int64_t w = 0;
    for (; w + 16 * TILE_VECTORS <= width; w += 16 * TILE_VECTORS)
        product_tile(ROWS, TILE_VECTORS, MODE, a, depth, pairs + w, width, moved(epilogue, 0, w, width), out + w);
    switch ((width - w) / 16) {
    case 3: product_tile(ROWS, 3, MODE, a, depth, pairs + w, width, moved(epilogue, 0, w, width), out + w); break;
    case 2: product_tile(ROWS, 2, MODE, a, depth, pairs + w, width, moved(epilogue, 0, w, width), out + w); break;
    case 1: product_tile(ROWS, 1, MODE, a, depth, pairs + w, width, moved(epilogue, 0, w, width), out + w); break;
    default: break;
    }
}

/* Rows [first, last) of the product, TILE_ROWS at a time and then the rows left one by one. */
static inline __attribute__((always_inline)) void product_range(const int MODE, const uint16_t *a, const uint32_t *pairs, int64_t first,
                                                                 int64_t last, int64_t depth, int64_t width, Epilogue epilogue,
                                                                 uint16_t *out) {
    int64_t row = first;
    for (; row + TILE_ROWS <= last; row += TILE_ROWS)
        product_rows(TILE_ROWS, MODE, a + row * depth, depth, pairs, width, moved(epilogue, row, 0, width), out + row * width);
    for (; row < last; row++)
        product_rows(1, MODE, a + row * depth, depth, pairs, width, moved(epilogue, row, 0, width), out + row * width);
}

/* Thread `thread` of `team`'s rows, as OpenMP's static schedule splits them. */
static inline void thread_rows(int64_t rows, int thread, int team, int64_t *first, int64_t *last) {
    int64_t share = rows / team, extra = rows % team;
    *first = thread * share + (thread < extra ? thread : extra);
    *last = *first + share + (thread < extra);
}

/* out (rows × width) = a (rows × depth) · B + bias, bf16, row-major; B as pairs (depth/2 × width) from
 * vitlab_pack_linear_weight; bias (width bf16 numbers) may be NULL. depth even, width a multiple of 16. */
void vitlab_matmul_pairs(const uint16_t *a, const uint32_t *pairs, const uint16_t *bias, uint16_t *out, int64_t rows, int64_t depth,
                         int64_t width, int threads) {
    Epilogue epilogue = {.bias_bf16 = bias};
#pragma omp parallel num_threads(threads) if (rows > TILE_ROWS)
    {
        int64_t first, last;
        thread_rows(rows, omp_get_thread_num(), omp_get_num_threads(), &first, &last);
        product_range(PLAIN, a, pairs, first, last, depth, width, epilogue, out);
    }
}

/* The first layer of an MLP and its GELU: out = GELU(round_bf16(a · B) + bias) and derivative = GELU' of the same, bf16
 * (rows × width); bias fp32 (width). */
void vitlab_matmul_gelu(const uint16_t *a, const uint32_t *pairs, const float *bias, uint16_t *out, uint16_t *derivative, int64_t rows,
                        int64_t depth, int64_t width, int threads) {
    Epilogue epilogue = {.bias = bias, .derivative = derivative};
#pragma omp parallel num_threads(threads) if (rows > TILE_ROWS)
    {
        int64_t first, last;
        thread_rows(rows, omp_get_thread_num(), omp_get_num_threads(), &first, &last);
        product_range(GELU, a, pairs, first, last, depth, width, epilogue, out);
    }
}

#else

int vitlab_matmul_supported(void) { return 0; }

void vitlab_pack_linear_weight(const uint16_t *weight, uint32_t *forward_pairs, uint32_t *backward_pairs, int64_t outs, int64_t ins) {
    (void)weight, (void)forward_pairs, (void)backward_pairs, (void)outs, (void)ins;
    abort(); /* callers check vitlab_matmul_supported() first */
}

void vitlab_matmul_pairs(const uint16_t *a, const uint32_t *pairs, const uint16_t *bias, uint16_t *out, int64_t rows, int64_t depth,
                         int64_t width, int threads) {
    (void)a, (void)pairs, (void)bias, (void)out, (void)rows, (void)depth, (void)width, (void)threads;
    abort();
}

void vitlab_matmul_gelu(const uint16_t *a, const uint32_t *pairs, const float *bias, uint16_t *out, uint16_t *derivative, int64_t rows,
                        int64_t depth, int64_t width, int threads) {
    (void)a, (void)pairs, (void)bias, (void)out, (void)derivative, (void)rows, (void)depth, (void)width, (void)threads;
    abort();
}

#endif
