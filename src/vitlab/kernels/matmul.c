/* A linear layer's forward and input-gradient products in bf16: out = a · B (+ bias), B a small matrix (a layer's
 * weight or its transpose) packed once per call.
 *
 * PyTorch's bf16 matmuls go to oneDNN, which ran the ViTs' narrow shapes (64 to 512 features, thousands of token
 * rows) below the machine's bf16 peak and pays a fixed cost per call (docs/performance.md). Here `vdpbf16ps`
 * multiplies pairs along the sum: a row of a (row-major, its depth axis contiguous) already holds its pairs side by
 * side, so each is broadcast straight from memory; B is packed as pairs[p][w] = (B[2p][w], B[2p+1][w]). Every tile of
 * TILE_ROWS rows × up to TILE_VECTORS·16 outputs keeps its sums in registers through the whole depth.
 *
 * Numerics: each output is one fp32 sum over the depth, pair by pair in order, then (plus the bias, a bf16 number)
 * rounded to bf16 once — the same bits as oneDNN's product up to a depth of 512, where oneDNN too sums in one chain
 * (kernels/matmul.py keeps deeper products with oneDNN; tests/kernels/test_matmul_kernel.py). bf16 subnormal inputs
 * count as 0, as in oneDNN.
 */
#include <stdlib.h>
#include <string.h>

#include "bf16_math.h"

#define TILE_ROWS 6
#define TILE_VECTORS 4

/* Built where the CPU has AVX-512 BF16 but no AMX: with AMX tiles (Sapphire Rapids and later) oneDNN's bf16 products
 * run on them, at several times vdpbf16ps's rate, so there the products stay with oneDNN. */
#if defined(VITLAB_AVX512) && defined(__AVX512BF16__) && !defined(__AMX_BF16__)

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

/* out[r][16v + lane] = Σ_p a[r] pair p · pairs[p][16v + lane] (+ bias), r < ROWS, v < VECTORS; a's rows `depth` long,
 * out's and pairs' rows `width`. ROWS and VECTORS are constants at every call. Meanwhile the first `ahead_lines` cache
 * lines from `ahead` (the next rows of a) are fetched, one per pair: for a deep product a's rows would otherwise
 * arrive from memory only when the next tile broadcasts them, with the dot-product unit waiting. */
static inline __attribute__((always_inline)) void product_tile(const int ROWS, const int VECTORS, const uint16_t *a, int64_t depth,
                                                                const uint32_t *pairs, int64_t width, const uint16_t *bias,
                                                                uint16_t *out, const char *ahead, int64_t ahead_lines) {
    __m512 sums[TILE_ROWS][TILE_VECTORS];
    for (int r = 0; r < ROWS; r++)
        for (int v = 0; v < VECTORS; v++)
            sums[r][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < depth / 2; p++) {
        if (p < ahead_lines)
            _mm_prefetch(ahead + 64 * p, _MM_HINT_T0);
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
        __m512 shift = bias == NULL ? _mm512_setzero_ps() : load_bf16(bias + 16 * v, 0xFFFF);
        for (int r = 0; r < ROWS; r++)
            store_bf16_rounded(out + r * width + 16 * v, bias == NULL ? sums[r][v] : _mm512_add_ps(sums[r][v], shift), 0xFFFF);
    }
}

/* ROWS rows of a times all of B, TILE_VECTORS·16 outputs at a time (width a multiple of 16); the first tile fetches the
 * `ahead_rows` rows of a after these. */
static inline __attribute__((always_inline)) void product_rows(const int ROWS, const uint16_t *a, int64_t depth, const uint32_t *pairs,
                                                                int64_t width, const uint16_t *bias, uint16_t *out, int64_t ahead_rows) {
    const char *ahead = (const char *)(a + ROWS * depth);
    int64_t ahead_lines = ahead_rows * depth * (int64_t)sizeof(uint16_t) / 64, w = 0;
    for (; w + 16 * TILE_VECTORS <= width; w += 16 * TILE_VECTORS, ahead_lines = 0)
        product_tile(ROWS, TILE_VECTORS, a, depth, pairs + w, width, bias == NULL ? NULL : bias + w, out + w, ahead, ahead_lines);
    switch ((width - w) / 16) {
    case 3: product_tile(ROWS, 3, a, depth, pairs + w, width, bias == NULL ? NULL : bias + w, out + w, ahead, ahead_lines); break;
    case 2: product_tile(ROWS, 2, a, depth, pairs + w, width, bias == NULL ? NULL : bias + w, out + w, ahead, ahead_lines); break;
    case 1: product_tile(ROWS, 1, a, depth, pairs + w, width, bias == NULL ? NULL : bias + w, out + w, ahead, ahead_lines); break;
    default: break;
    }
}

/* out (rows × width) = a (rows × depth) · B + bias, bf16, row-major; B as pairs (depth/2 × width) from
 * vitlab_pack_linear_weight; bias (width bf16 numbers) may be NULL. depth even, width a multiple of 16. */
void vitlab_matmul_pairs(const uint16_t *a, const uint32_t *pairs, const uint16_t *bias, uint16_t *out, int64_t rows, int64_t depth,
                         int64_t width, int threads) {
    int64_t blocks = (rows + TILE_ROWS - 1) / TILE_ROWS;
#pragma omp parallel for num_threads(threads) schedule(static) if (blocks > 1)
    for (int64_t block = 0; block < blocks; block++) {
        int64_t first = block * TILE_ROWS, left = rows - first;
        const uint16_t *block_a = a + first * depth;
        uint16_t *block_out = out + first * width;
        int64_t next_rows = left >= 2 * TILE_ROWS ? TILE_ROWS : left - TILE_ROWS; /* the next block's, fetched meanwhile */
        switch (left >= TILE_ROWS ? TILE_ROWS : left) {
        case 6: product_rows(6, block_a, depth, pairs, width, bias, block_out, next_rows); break;
        case 5: product_rows(5, block_a, depth, pairs, width, bias, block_out, 0); break;
        case 4: product_rows(4, block_a, depth, pairs, width, bias, block_out, 0); break;
        case 3: product_rows(3, block_a, depth, pairs, width, bias, block_out, 0); break;
        case 2: product_rows(2, block_a, depth, pairs, width, bias, block_out, 0); break;
        default: product_rows(1, block_a, depth, pairs, width, bias, block_out, 0); break;
        }
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

#endif
