/* Self-attention for short sequences (T <= 272 tokens, heads of 16, 32, 48 or 64), forward and backward, one
 * (image, head) at a time in the CPU's caches, with AVX-512 BF16 dot products (Zen 4, Sapphire Rapids and later).
 *
 * PyTorch computes softmax(Q Kᵀ) V as two batched matmuls, a softmax and copies of Q, K, V into head-major layouts,
 * each a pass over memory, and its batched products of such small matrices ran far below the machine's bf16 peak
 * (docs/performance.md). Here every (image, head) reads Q, K, V straight from the QKV projection's output
 * (B, T, 3, H, Dh), keeps its T × T scores in registers, and writes its output straight into (B, T, H, Dh), the
 * layout the output projection reads. Forward also stores the attention weights for backward, each row padded with
 * zeros to a multiple of 16 tokens (B, H, T, PADDED(T)): the layout its P V product reads, so they are written once.
 *
 * Attention dropout (training only): the weights P' = P · m / (1 − p) go into P V, where m keeps a weight when 15 bits of
 * a SplitMix64 number (dropout.c's generator, under a key drawn per call) reach the drop threshold; row i of (image,
 * head) item takes words (item · T + i) · PADDED(T) / 4 onwards, four weights per word (its 16-bit quarters, low first),
 * so backward regenerates the mask from the key. Forward keeps P, not P', for backward: with D = diag(m / (1 − p)),
 * dP = (dO Vᵀ) D, dS = P ⊙ (dP − rowsum(dO ⊙ O)) (Σ_j P_ij dP_ij is still dO_i · O_i), dV = P'ᵀ dO.
 *
 * Numerics: products of bf16 numbers accumulated in fp32 (as PyTorch's bf16 matmuls do), scores kept in fp32, the
 * softmax in fp32; the weights, the output and every gradient are rounded to bf16, as on PyTorch's bf16 path.
 *
 * `vdpbf16ps` multiplies pairs: lane l of acc += a[2l]·b[2l] + a[2l+1]·b[2l+1]. So every matrix that a product runs
 * over is packed as pairs of bf16 numbers in one uint32, along the axis the product sums over:
 *   pairs_by_column[e][j] = (M[j][2e], M[j][2e+1])   sums over the head's features (Q Kᵀ, dO Vᵀ),
 *   pairs_by_row[p][d]    = (M[2p][d], M[2p+1][d])   sums over tokens (P V, dS K, dSᵀ Q, Pᵀ dO).
 *
 * On CPUs with AMX (Sapphire Rapids), where `vdpbf16ps` is slow, the products that sum over tokens run on the AMX
 * tiles 16 output rows at a time: the forward's P V and the backward's dS K, dSᵀ Q and Pᵀ dO. pairs_by_row is the layout
 * their second operand takes as it is; for the last two, dS's and P's pairs are transposed in 16 × 16 blocks first
 * (docs/performance.md, "The Intel machine's AMX"). For heads of 32 features and more so do the two that sum over
 * features, the forward's Q Kᵀ and the backward's dO Vᵀ, whose second operand is pairs_by_column as it is (with heads
 * of 16 the tiles' half-filled products ran no faster than the vector code). The tiles add a row's products in another order than the vector code, so on such CPUs an output can differ
 * from the vector code's in the last bf16 bit.
 */
#define _DEFAULT_SOURCE /* syscall(), for AMX's permission request */
#include <stdlib.h>

#include "amx.h"
#include "bf16_math.h"

#define MAX_TOKENS 272 /* 17 vectors of 16: row_times_columns_17 */
#define MAX_HEAD 64
#define PADDED(count) (((count) + 15) / 16 * 16)
#define PREFETCH_ROWS 4
#define GOLDEN_GAMMA 0x9E3779B97F4A7C15ull /* SplitMix64's increment, as in dropout.c */

#if defined(VITLAB_AVX512) && defined(__AVX512BF16__) && defined(__AVX512DQ__)

int vitlab_attention_supported(void) { return 1; }

/* One (image, head)'s rows of a (B, T, ?, H, Dh)-like tensor: row t at base + t * row_stride. */
typedef struct {
    const uint16_t *base;
    int64_t row_stride;
} Rows;

/* Pair `index` of a bf16 row, i.e. (row[2 index], row[2 index + 1]) as one uint32 (memcpy: no aliasing of types). */
static inline uint32_t pair_at(const void *row, int64_t index) {
    uint32_t pair;
    memcpy(&pair, (const char *)row + 4 * index, sizeof pair);
    return pair;
}

/* Attention dropout for one call: weights whose 15-bit number is below `threshold` are dropped (0: no dropout), the
 * others multiplied by `scale`; `key` seeds the numbers. */
typedef struct {
    uint32_t threshold;
    float scale;
    uint64_t key;
} Dropout;

/* keep[jv] (bit l: token 16 jv + l kept) for row `row` of item `item` (T tokens): word w of the row is SplitMix64's
 * output for counter key + (first + w + 1) γ, first = (item · T + row) · PADDED(T) / 4, and token j takes its quarter
 * j % 4 of word j / 4; eight words (32 tokens) at a time. */
static inline void row_keep_masks(Dropout dropout, int64_t item, int64_t row, int64_t tokens, __mmask16 *keep) {
    int64_t padded = PADDED(tokens);
    uint64_t first = (uint64_t)(item * tokens + row) * (uint64_t)(padded / 4);
    __m512i counter = _mm512_add_epi64(_mm512_set1_epi64((long long)(dropout.key + (first + 1) * GOLDEN_GAMMA)),
                                       _mm512_mullo_epi64(_mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi64((long long)GOLDEN_GAMMA)));
    const __m512i step = _mm512_set1_epi64((long long)(8 * GOLDEN_GAMMA)), low15 = _mm512_set1_epi16(0x7FFF);
    const __m512i threshold = _mm512_set1_epi16((short)dropout.threshold);
    for (int64_t jv = 0; jv < padded / 16; jv += 2) {
        __m512i z = counter;
        z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)), _mm512_set1_epi64((long long)0xBF58476D1CE4E5B9ull));
        z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)), _mm512_set1_epi64((long long)0x94D049BB133111EBull));
        z = _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
        __mmask32 kept = _mm512_cmpge_epu16_mask(_mm512_and_si512(z, low15), threshold);
        keep[jv] = (__mmask16)kept;
        if (jv + 1 < padded / 16)
            keep[jv + 1] = (__mmask16)(kept >> 16);
        counter = _mm512_add_epi64(counter, step);
    }
}

/* P' of one row of weights (bf16 P, PADDED(T) of them) into `dropped`: P · scale rounded to bf16 where kept, else 0. */
static inline void drop_row(const uint16_t *weights, uint16_t *dropped, Dropout dropout, int64_t item, int64_t row, int64_t tokens) {
    __mmask16 keep[MAX_TOKENS / 16];
    row_keep_masks(dropout, item, row, tokens, keep);
    __m512 scale = _mm512_set1_ps(dropout.scale);
    for (int64_t jv = 0; jv < PADDED(tokens) / 16; jv++)
        _mm256_storeu_si256((__m256i *)(dropped + 16 * jv),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_mul_ps(keep[jv], load_bf16(weights + 16 * jv, 0xFFFF), scale)));
}

/* pairs[e * PADDED(T) + j] = (M[j][2e], M[j][2e+1]): row j read as Dh / 2 pairs, transposed; zero for padded j. */
static void pack_pairs_by_column(Rows matrix, int64_t tokens, int64_t head_size, uint32_t *pairs) {
    int64_t padded = PADDED(tokens);
    for (int64_t j = 0; j < tokens; j++) {
        const uint16_t *row = matrix.base + j * matrix.row_stride;
        for (int64_t e = 0; e < head_size / 2; e++)
            pairs[e * padded + j] = pair_at(row, e);
    }
    for (int64_t e = 0; e < head_size / 2; e++)
        for (int64_t j = tokens; j < padded; j++)
            pairs[e * padded + j] = 0;
}

/* 16 bf16 numbers of a row (those `mask` selects, 0 elsewhere), scaled (and rounded to bf16 again) unless scale is
 * 1, widened to 32-bit lanes. */
static inline __m512i scaled_lanes(const uint16_t *row, __mmask16 mask, float scale) {
    __m256i bits = _mm256_maskz_loadu_epi16(mask, row);
    if (scale != 1.0f)
        bits = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(load_bf16(row, mask), _mm512_set1_ps(scale)));
    return _mm512_cvtepu16_epi32(bits);
}

/* pairs[p * PADDED(columns) + c] = (M[2p][c], M[2p+1][c]) · scale for the first `count` rows of M; zero for rows >= count
 * and columns >= columns. Vectorised: 16 columns of two rows at a time. */
static void pack_pairs_by_row(Rows matrix, int64_t count, int64_t columns, float scale, uint32_t *pairs) {
    int64_t stride = PADDED(columns);
    for (int64_t p = 0; p < (count + 1) / 2; p++) {
        const uint16_t *even = matrix.base + 2 * p * matrix.row_stride;
        for (int64_t c = 0; c < stride; c += 16) {
            __mmask16 mask = tail_mask(columns - c);
            __m512i low = scaled_lanes(even + c, mask, scale);
            __m512i high = 2 * p + 1 < count ? scaled_lanes(even + matrix.row_stride + c, mask, scale) : _mm512_setzero_si512();
            _mm512_storeu_si512(pairs + p * stride + c, _mm512_or_si512(low, _mm512_slli_epi32(high, 16)));
        }
    }
}

/* scores[jv] (16 lanes each) = Σ_e pair e of row · pairs_by_column[e][16 jv ..]: a row of Dh times Mᵀ, all padded j.
 * Written once per bound LIMIT on the number of 16-token vectors: its loops over jv run to LIMIT, so the compiler
 * unrolls them fully and keeps every accumulator in a register through the whole sum (an array indexed at run time
 * inside the sum would go through memory); each pair of the row is broadcast once. EXACT versions are for exactly
 * LIMIT vectors (no guard per vector); the others check jv against the row's count. */
#define DEFINE_ROW_TIMES_COLUMNS(NAME, LIMIT, EXACT)                                                                     \
    static inline void NAME(const uint16_t *row, const uint32_t *pairs_by_column, int64_t padded, int64_t head_size,     \
                            __m512 *scores) {                                                                            \
        int64_t vectors = padded / 16;                                                                                   \
        __m512 sums[LIMIT];                                                                                              \
        _Pragma("GCC unroll 17") for (int jv = 0; jv < LIMIT; jv++) sums[jv] = _mm512_setzero_ps();                     \
        for (int64_t e = 0; e < head_size / 2; e++) {                                                                    \
            __m512bh pair = (__m512bh)_mm512_set1_epi32((int)pair_at(row, e));                                           \
            const uint32_t *columns = pairs_by_column + e * padded;                                                      \
            _Pragma("GCC unroll 17") for (int jv = 0; jv < LIMIT; jv++) if (EXACT || jv < vectors) sums[jv] =           \
                _mm512_dpbf16_ps(sums[jv], pair, (__m512bh)_mm512_loadu_si512(columns + 16 * jv));                       \
        }                                                                                                                \
        _Pragma("GCC unroll 17") for (int jv = 0; jv < LIMIT; jv++) if (EXACT || jv < vectors) scores[jv] = sums[jv];   \
    }
DEFINE_ROW_TIMES_COLUMNS(row_times_columns_4, 4, 0)
DEFINE_ROW_TIMES_COLUMNS(row_times_columns_exactly_5, 5, 1)
DEFINE_ROW_TIMES_COLUMNS(row_times_columns_8, 8, 0)
DEFINE_ROW_TIMES_COLUMNS(row_times_columns_17, 17, 0)
DEFINE_ROW_TIMES_COLUMNS(row_times_columns_exactly_17, 17, 1)

static inline void row_times_columns(const uint16_t *row, const uint32_t *pairs_by_column, int64_t tokens,
                                     int64_t head_size, __m512 *scores) {
    int64_t padded = PADDED(tokens);
    if (padded <= 4 * 16)
        row_times_columns_4(row, pairs_by_column, padded, head_size, scores);
    else if (padded == 5 * 16)
        row_times_columns_exactly_5(row, pairs_by_column, padded, head_size, scores);
    else if (padded <= 8 * 16)
        row_times_columns_8(row, pairs_by_column, padded, head_size, scores);
    else if (padded == 17 * 16)
        row_times_columns_exactly_17(row, pairs_by_column, padded, head_size, scores);
    else
        row_times_columns_17(row, pairs_by_column, padded, head_size, scores);
}

/* out[dv] (16 lanes each) = Σ_p weight pair p · pairs_by_row[p][16 dv ..]: T weights times M (T × Dh). Weight pair p
 * is the uint32 at weights + p · stride: a bf16 row read as pairs (stride 1; for odd T the row holds a zero after its
 * last weight), or a column of a matrix packed by pack_pairs_by_row (stride: its padded width). Four register
 * accumulators per output vector (p mod 4) keep the dot-product unit busy; the loops over dv are unrolled as above. */
static inline void row_times_rows(const void *weights, int64_t stride, const uint32_t *pairs_by_row, int64_t tokens,
                                  int64_t head_size, __m512 *out) {
    int64_t pairs = (tokens + 1) / 2, vectors = head_size / 16;
    __m512 sums[4][MAX_HEAD / 16];
    for (int chain = 0; chain < 4; chain++)
        for (int dv = 0; dv < MAX_HEAD / 16; dv++)
            sums[chain][dv] = _mm512_setzero_ps();
    int64_t p = 0;
    for (; p + 3 < pairs; p += 4) {
#pragma GCC unroll 4
        for (int chain = 0; chain < 4; chain++) {
            __m512bh weight = (__m512bh)_mm512_set1_epi32((int)pair_at(weights, (p + chain) * stride));
            const uint32_t *rows = pairs_by_row + (p + chain) * head_size;
#pragma GCC unroll 4
            for (int dv = 0; dv < MAX_HEAD / 16; dv++)
                if (dv < vectors)
                    sums[chain][dv] = _mm512_dpbf16_ps(sums[chain][dv], weight, (__m512bh)_mm512_loadu_si512(rows + 16 * dv));
        }
    }
    for (; p < pairs; p++) {
        __m512bh weight = (__m512bh)_mm512_set1_epi32((int)pair_at(weights, p * stride));
#pragma GCC unroll 4
        for (int dv = 0; dv < MAX_HEAD / 16; dv++)
            if (dv < vectors)
                sums[0][dv] = _mm512_dpbf16_ps(sums[0][dv], weight, (__m512bh)_mm512_loadu_si512(pairs_by_row + p * head_size + 16 * dv));
    }
#pragma GCC unroll 4
    for (int dv = 0; dv < MAX_HEAD / 16; dv++)
        if (dv < vectors)
            out[dv] = _mm512_add_ps(_mm512_add_ps(sums[0][dv], sums[1][dv]), _mm512_add_ps(sums[2][dv], sums[3][dv]));
}

/* row_times_rows for ROW_BLOCK rows of weights at once, each vector of M loaded once for all of them: row r's pair p
 * is the uint32 at weights + r · row_step + p · stride, out[r] its result. One version per head width (VECTORS of 16
 * features); with one vector per row, two accumulators per row (p even and odd) keep eight products in flight. */
#define ROW_BLOCK 4
#define DEFINE_BLOCK_TIMES_ROWS(VECTORS, CHAINS)                                                                          \
    static inline void block_times_rows_##VECTORS(const void *weights, int64_t row_step, int64_t stride,                 \
                                                  const uint32_t *pairs_by_row, int64_t tokens,                          \
                                                  __m512 out[ROW_BLOCK][MAX_HEAD / 16]) {                                \
        int64_t pairs = (tokens + 1) / 2, p = 0;                                                                         \
        __m512 sums[CHAINS][ROW_BLOCK][VECTORS];                                                                         \
        _Pragma("GCC unroll 2") for (int chain = 0; chain < CHAINS; chain++)                                            \
            _Pragma("GCC unroll 4") for (int r = 0; r < ROW_BLOCK; r++)                                                 \
                _Pragma("GCC unroll 4") for (int dv = 0; dv < VECTORS; dv++) sums[chain][r][dv] = _mm512_setzero_ps(); \
        for (; p + CHAINS <= pairs; p += CHAINS) {                                                                       \
            _Pragma("GCC unroll 2") for (int chain = 0; chain < CHAINS; chain++) {                                      \
                __m512bh rows[VECTORS];                                                                                  \
                _Pragma("GCC unroll 4") for (int dv = 0; dv < VECTORS; dv++) rows[dv] =                                 \
                    (__m512bh)_mm512_loadu_si512(pairs_by_row + (p + chain) * 16 * VECTORS + 16 * dv);                   \
                _Pragma("GCC unroll 4") for (int r = 0; r < ROW_BLOCK; r++) {                                           \
                    __m512bh weight = (__m512bh)_mm512_set1_epi32((int)pair_at(weights, r * row_step + (p + chain) * stride)); \
                    _Pragma("GCC unroll 4") for (int dv = 0; dv < VECTORS; dv++) sums[chain][r][dv] =                   \
                        _mm512_dpbf16_ps(sums[chain][r][dv], weight, rows[dv]);                                          \
                }                                                                                                        \
            }                                                                                                            \
        }                                                                                                                \
        for (; p < pairs; p++) {                                                                                         \
            _Pragma("GCC unroll 4") for (int r = 0; r < ROW_BLOCK; r++) {                                               \
                __m512bh weight = (__m512bh)_mm512_set1_epi32((int)pair_at(weights, r * row_step + p * stride));        \
                _Pragma("GCC unroll 4") for (int dv = 0; dv < VECTORS; dv++) sums[0][r][dv] = _mm512_dpbf16_ps(         \
                    sums[0][r][dv], weight, (__m512bh)_mm512_loadu_si512(pairs_by_row + p * 16 * VECTORS + 16 * dv));    \
            }                                                                                                            \
        }                                                                                                                \
        _Pragma("GCC unroll 4") for (int r = 0; r < ROW_BLOCK; r++)                                                     \
            _Pragma("GCC unroll 4") for (int dv = 0; dv < VECTORS; dv++) {                                              \
                __m512 total = sums[0][r][dv];                                                                           \
                _Pragma("GCC unroll 2") for (int chain = 1; chain < CHAINS; chain++) total =                            \
                    _mm512_add_ps(total, sums[chain][r][dv]);                                                            \
                out[r][dv] = total;                                                                                      \
            }                                                                                                            \
    }
DEFINE_BLOCK_TIMES_ROWS(1, 2)
DEFINE_BLOCK_TIMES_ROWS(2, 1)
DEFINE_BLOCK_TIMES_ROWS(3, 1)
DEFINE_BLOCK_TIMES_ROWS(4, 1)

static inline void block_times_rows(const void *weights, int64_t row_step, int64_t stride, const uint32_t *pairs_by_row,
                                    int64_t tokens, int64_t head_size, __m512 out[ROW_BLOCK][MAX_HEAD / 16]) {
    switch (head_size / 16) {
    case 1: block_times_rows_1(weights, row_step, stride, pairs_by_row, tokens, out); break;
    case 2: block_times_rows_2(weights, row_step, stride, pairs_by_row, tokens, out); break;
    case 3: block_times_rows_3(weights, row_step, stride, pairs_by_row, tokens, out); break;
    default: block_times_rows_4(weights, row_step, stride, pairs_by_row, tokens, out); break;
    }
}

/* One query row's attention weights: softmax of (scaled query row) · Kᵀ over the T tokens, written as bf16 to
 * weight_row for all padded tokens (zeros beyond T); the token `masked` (the row's own, with LSA's diagonal mask; -1:
 * none) is left out. Written per bound on the vectors of 16 tokens, as row_times_columns, so that the scores stay in
 * registers from the products through the softmax to the store. */
#define DEFINE_QUERY_ROW_TO_WEIGHTS(NAME, LIMIT, EXACT, ROW_TIMES_COLUMNS)                                               \
    static inline void NAME(const uint16_t *query_row, const uint32_t *key_pairs, int64_t tokens, int64_t head_size,     \
                            int64_t masked, uint16_t *weight_row) {                                                      \
        int64_t padded = PADDED(tokens), vectors = padded / 16;                                                          \
        __m512 scores[LIMIT], minus_infinity = _mm512_set1_ps(-INFINITY);                                                \
        ROW_TIMES_COLUMNS(query_row, key_pairs, padded, head_size, scores);                                              \
        __m512 maximum = minus_infinity;                                                                                 \
        _Pragma("GCC unroll 17") for (int jv = 0; jv < LIMIT; jv++) if (EXACT || jv < vectors) {                        \
            __mmask16 outside = jv == vectors - 1 ? (__mmask16)~tail_mask(tokens - 16 * jv) : 0;                         \
            if (masked >= 16 * jv && masked < 16 * jv + 16)                                                              \
                outside |= (__mmask16)(1u << (masked - 16 * jv));                                                        \
            scores[jv] = _mm512_mask_mov_ps(scores[jv], outside, minus_infinity);                                        \
            maximum = _mm512_max_ps(maximum, scores[jv]);                                                                \
        }                                                                                                                \
        float row_maximum = _mm512_reduce_max_ps(maximum);                                                               \
        __m512 shift = _mm512_set1_ps(row_maximum == -INFINITY ? 0.0f : row_maximum), total = _mm512_setzero_ps();       \
        _Pragma("GCC unroll 17") for (int jv = 0; jv < LIMIT; jv++) if (EXACT || jv < vectors) {                        \
            scores[jv] = exp_nonpositive_vector(_mm512_sub_ps(scores[jv], shift));                                       \
            total = _mm512_add_ps(total, scores[jv]);                                                                    \
        }                                                                                                                \
        __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));                                             \
        _Pragma("GCC unroll 17") for (int jv = 0; jv < LIMIT; jv++) if (EXACT || jv < vectors)                          \
            store_bf16_rounded(weight_row + 16 * jv, _mm512_mul_ps(scores[jv], inverse), 0xFFFF);                               \
    }
DEFINE_QUERY_ROW_TO_WEIGHTS(query_row_to_weights_4, 4, 0, row_times_columns_4)
DEFINE_QUERY_ROW_TO_WEIGHTS(query_row_to_weights_exactly_5, 5, 1, row_times_columns_exactly_5)
DEFINE_QUERY_ROW_TO_WEIGHTS(query_row_to_weights_8, 8, 0, row_times_columns_8)
DEFINE_QUERY_ROW_TO_WEIGHTS(query_row_to_weights_exactly_17, 17, 1, row_times_columns_exactly_17)
DEFINE_QUERY_ROW_TO_WEIGHTS(query_row_to_weights_17, 17, 0, row_times_columns_17)

static inline void query_row_to_weights(const uint16_t *query_row, const uint32_t *key_pairs, int64_t tokens,
                                        int64_t head_size, int64_t masked, uint16_t *weight_row) {
    int64_t padded = PADDED(tokens);
    if (padded <= 4 * 16)
        query_row_to_weights_4(query_row, key_pairs, tokens, head_size, masked, weight_row);
    else if (padded == 5 * 16)
        query_row_to_weights_exactly_5(query_row, key_pairs, tokens, head_size, masked, weight_row);
    else if (padded <= 8 * 16)
        query_row_to_weights_8(query_row, key_pairs, tokens, head_size, masked, weight_row);
    else if (padded == 17 * 16)
        query_row_to_weights_exactly_17(query_row, key_pairs, tokens, head_size, masked, weight_row);
    else
        query_row_to_weights_17(query_row, key_pairs, tokens, head_size, masked, weight_row);
}

/* row_times_columns for two rows at once (`first` and `second`), up to 8 vectors of 16 columns (16 accumulators): each
 * vector of Mᵀ is loaded once for both rows. The sums run in row_times_columns' order, so the results are the same
 * bits. */
#define DEFINE_TWO_ROWS_TIMES_COLUMNS(NAME, LIMIT, EXACT)                                                                \
    static inline void NAME(const uint16_t *first, const uint16_t *second, const uint32_t *pairs_by_column,             \
                            int64_t padded, int64_t head_size, __m512 scores[2][LIMIT]) {                                \
        int64_t vectors = padded / 16;                                                                                   \
        _Pragma("GCC unroll 8") for (int jv = 0; jv < LIMIT; jv++) {                                                    \
            scores[0][jv] = _mm512_setzero_ps();                                                                         \
            scores[1][jv] = _mm512_setzero_ps();                                                                         \
        }                                                                                                                \
        for (int64_t e = 0; e < head_size / 2; e++) {                                                                    \
            __m512bh first_pair = (__m512bh)_mm512_set1_epi32((int)pair_at(first, e));                                   \
            __m512bh second_pair = (__m512bh)_mm512_set1_epi32((int)pair_at(second, e));                                 \
            const uint32_t *columns = pairs_by_column + e * padded;                                                      \
            _Pragma("GCC unroll 8") for (int jv = 0; jv < LIMIT; jv++) if (EXACT || jv < vectors) {                     \
                __m512bh column = (__m512bh)_mm512_loadu_si512(columns + 16 * jv);                                       \
                scores[0][jv] = _mm512_dpbf16_ps(scores[0][jv], first_pair, column);                                     \
                scores[1][jv] = _mm512_dpbf16_ps(scores[1][jv], second_pair, column);                                    \
            }                                                                                                            \
        }                                                                                                                \
    }
DEFINE_TWO_ROWS_TIMES_COLUMNS(two_rows_times_columns_4, 4, 0)
DEFINE_TWO_ROWS_TIMES_COLUMNS(two_rows_times_columns_exactly_5, 5, 1)
DEFINE_TWO_ROWS_TIMES_COLUMNS(two_rows_times_columns_8, 8, 0)

/* Whether the two-row versions take rows of `tokens` scores. */
static inline int two_rows_at_a_time(int64_t tokens) { return PADDED(tokens) <= 8 * 16; }

/* query_row_to_weights for two query rows at once (rows `query_rows` and `query_rows` + MAX_HEAD, written to
 * `weight_rows` and `weight_rows` + `weight_stride`; `masked`: the first row's masked token, the second's is the next
 * one), for up to 8 vectors of 16 tokens: the two rows' reductions and divisions overlap instead of each waiting on
 * the previous one, and every sum runs in query_row_to_weights' order, so the weights are the same bits. */
#define DEFINE_TWO_QUERY_ROWS_TO_WEIGHTS(NAME, LIMIT, EXACT, TWO_ROWS_TIMES_COLUMNS)                                     \
    static inline void NAME(const uint16_t *query_rows, const uint32_t *key_pairs, int64_t tokens, int64_t head_size,    \
                            int64_t masked, uint16_t *weight_rows, int64_t weight_stride) {                              \
        int64_t padded = PADDED(tokens), vectors = padded / 16;                                                          \
        __m512 scores[2][LIMIT], minus_infinity = _mm512_set1_ps(-INFINITY);                                             \
        TWO_ROWS_TIMES_COLUMNS(query_rows, query_rows + MAX_HEAD, key_pairs, padded, head_size, scores);                 \
        __m512 maximum[2] = {minus_infinity, minus_infinity}, total[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};     \
        _Pragma("GCC unroll 8") for (int jv = 0; jv < LIMIT; jv++) if (EXACT || jv < vectors) {                         \
            __mmask16 outside = jv == vectors - 1 ? (__mmask16)~tail_mask(tokens - 16 * jv) : 0;                         \
            _Pragma("GCC unroll 2") for (int r = 0; r < 2; r++) {                                                       \
                __mmask16 row_outside = outside;                                                                         \
                if (masked >= 0 && masked + r >= 16 * jv && masked + r < 16 * jv + 16)                                   \
                    row_outside |= (__mmask16)(1u << (masked + r - 16 * jv));                                            \
                scores[r][jv] = _mm512_mask_mov_ps(scores[r][jv], row_outside, minus_infinity);                          \
                maximum[r] = _mm512_max_ps(maximum[r], scores[r][jv]);                                                   \
            }                                                                                                            \
        }                                                                                                                \
        __m512 shift[2];                                                                                                 \
        _Pragma("GCC unroll 2") for (int r = 0; r < 2; r++) {                                                           \
            float row_maximum = _mm512_reduce_max_ps(maximum[r]);                                                        \
            shift[r] = _mm512_set1_ps(row_maximum == -INFINITY ? 0.0f : row_maximum);                                    \
        }                                                                                                                \
        _Pragma("GCC unroll 8") for (int jv = 0; jv < LIMIT; jv++) if (EXACT || jv < vectors)                           \
            _Pragma("GCC unroll 2") for (int r = 0; r < 2; r++) {                                                       \
                scores[r][jv] = exp_nonpositive_vector(_mm512_sub_ps(scores[r][jv], shift[r]));                          \
                total[r] = _mm512_add_ps(total[r], scores[r][jv]);                                                       \
            }                                                                                                            \
        _Pragma("GCC unroll 2") for (int r = 0; r < 2; r++) {                                                           \
            __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total[r]));                                      \
            _Pragma("GCC unroll 8") for (int jv = 0; jv < LIMIT; jv++) if (EXACT || jv < vectors)                       \
                store_bf16_rounded(weight_rows + r * weight_stride + 16 * jv, _mm512_mul_ps(scores[r][jv], inverse), 0xFFFF); \
        }                                                                                                                \
    }
DEFINE_TWO_QUERY_ROWS_TO_WEIGHTS(two_query_rows_to_weights_4, 4, 0, two_rows_times_columns_4)
DEFINE_TWO_QUERY_ROWS_TO_WEIGHTS(two_query_rows_to_weights_exactly_5, 5, 1, two_rows_times_columns_exactly_5)
DEFINE_TWO_QUERY_ROWS_TO_WEIGHTS(two_query_rows_to_weights_8, 8, 0, two_rows_times_columns_8)

/* The weights of query rows 0 .. 2⌊T/2⌋ - 1, two rows at a time (T <= 128; the caller does the last row of an odd
 * T). Not inlined: the forward's code for longer sequences stays as it was compiled without it (inlined, it ran
 * those slower). */
__attribute__((noinline)) static void paired_query_rows_to_weights(const uint16_t *scaled_queries, const uint32_t *key_pairs,
                                                                    int64_t tokens, int64_t head_size, int mask_diagonal,
                                                                    uint16_t *weight_rows, int64_t weight_stride) {
    int64_t padded = PADDED(tokens);
    for (int64_t i = 0; i + 2 <= tokens; i += 2) {
        const uint16_t *query_rows = scaled_queries + i * MAX_HEAD;
        int64_t masked = mask_diagonal ? i : -1;
        uint16_t *rows = weight_rows + i * weight_stride;
        if (padded <= 4 * 16)
            two_query_rows_to_weights_4(query_rows, key_pairs, tokens, head_size, masked, rows, weight_stride);
        else if (padded == 5 * 16)
            two_query_rows_to_weights_exactly_5(query_rows, key_pairs, tokens, head_size, masked, rows, weight_stride);
        else
            two_query_rows_to_weights_8(query_rows, key_pairs, tokens, head_size, masked, rows, weight_stride);
    }
}

/* Fetch rows [first, last) of the next item's matrices into the caches: `count` matrices whose rows are `row_stride`
 * apart, matrix m starting at starts[m], each row `bytes` long. Called a few rows at a time while this item's products
 * run, so that packing the next item does not wait on memory. */
static inline void fetch_rows(const uint16_t *const *starts, int count, int64_t row_stride, int64_t bytes, int64_t first, int64_t last) {
    for (int m = 0; m < count; m++)
        if (starts[m] != NULL)
            for (int64_t row = first; row < last; row++)
                for (int64_t byte = 0; byte < bytes; byte += 64)
                    _mm_prefetch((const char *)(starts[m] + row * row_stride) + byte, _MM_HINT_T0);
}

#ifdef VITLAB_AMX

/* Tiles: sums[dv] += weight chunk (tile A) · value pairs of that chunk, features 16 dv onwards (tile B). */
#define MIXING_PRODUCTS(A, B, WEIGHTS, PAIRS) TILE_PRODUCTS(A, B, WEIGHTS, weight_bytes, PAIRS, pair_bytes, vectors)

/* sums (AMX_ROWS × head_size fp32, row-major) = 16 bf16 rows (`stride` apart, zero from T to PADDED(T): the weights, dS,
 * or transposed pairs) · a T × head_size matrix as pairs_by_row (zero beyond T), which the tiles read 32 tokens at a
 * time, then 16 for an odd number of 16s. */
static void mixing_block_on_tiles(const uint16_t *weights, int64_t stride, const uint32_t *value_pairs, int64_t tokens,
                                  int64_t head_size, float *sums) {
    int64_t vectors = head_size / 16, weight_bytes = 2 * stride, pair_bytes = 4 * head_size, padded = PADDED(tokens);
    /* The tile intrinsics' asm does not tell the compiler which memory it reads or writes: barriers keep the operands'
     * stores before the tile loads and the reads of `sums` after the tile stores. */
    __asm__ volatile("" : : : "memory");
    ZERO_SUM_TILES();
    int64_t token = 0;
    for (; token + 32 <= padded; token += 32)
        MIXING_PRODUCTS(4, 6, weights + token, value_pairs + token / 2 * head_size);
    if (token < padded)
        MIXING_PRODUCTS(5, 7, weights + token, value_pairs + token / 2 * head_size);
    STORE_SUM_TILES(sums, 4 * head_size, vectors);
    __asm__ volatile("" : : : "memory");
}

/* Tiles: scores[t] += query chunk (tile A) · key pairs of that chunk, tokens 16 t onwards of the current 64 (tile B). */
#define SCORE_PRODUCTS(A, B, QUERIES, PAIRS) TILE_PRODUCTS(A, B, QUERIES, query_bytes, PAIRS, pair_bytes, blocks)

/* scores (AMX_ROWS × MAX_TOKENS fp32, row-major; columns up to PADDED(T)) = 16 scaled query rows (MAX_HEAD apart) · Kᵀ,
 * K as pairs_by_column (zero beyond T): 64 tokens of scores at a time in tiles 0–3, the head's features 32 at a time
 * (tiles 4 and 6), then 16 (tiles 5 and 7) for an odd number of 16s: the tiles of `configure_tiles(1)`. */
static void scores_block_on_tiles(const uint16_t *queries, const uint32_t *key_pairs, int64_t tokens, int64_t head_size,
                                  float *scores) {
    int64_t padded = PADDED(tokens), query_bytes = 2 * MAX_HEAD, pair_bytes = 4 * padded, score_bytes = 4 * MAX_TOKENS;
    __asm__ volatile("" : : : "memory"); /* as in mixing_block_on_tiles */
    for (int64_t column = 0; column < padded; column += 4 * 16) {
        int64_t blocks = (padded - column) / 16 < 4 ? (padded - column) / 16 : 4;
        ZERO_SUM_TILES();
        int64_t feature = 0;
        for (; feature + 32 <= head_size; feature += 32)
            SCORE_PRODUCTS(4, 6, queries + feature, key_pairs + feature / 2 * padded + column);
        if (feature < head_size)
            SCORE_PRODUCTS(5, 7, queries + feature, key_pairs + feature / 2 * padded + column);
        STORE_SUM_TILES(scores + column, score_bytes, blocks);
    }
    __asm__ volatile("" : : : "memory");
}

/* One row of scores (fp32, PADDED(T) wide, overwritten) → its attention weights as query_row_to_weights computes them
 * from its register scores (the same masking, softmax and rounding, in the same order). */
static inline void scores_to_weights(float *scores, int64_t tokens, int64_t masked, uint16_t *weight_row) {
    int64_t vectors = PADDED(tokens) / 16;
    __m512 minus_infinity = _mm512_set1_ps(-INFINITY), maximum = minus_infinity, total = _mm512_setzero_ps();
    for (int64_t jv = 0; jv < vectors; jv++) {
        __mmask16 outside = jv == vectors - 1 ? (__mmask16)~tail_mask(tokens - 16 * jv) : 0;
        if (masked >= 16 * jv && masked < 16 * jv + 16)
            outside |= (__mmask16)(1u << (masked - 16 * jv));
        __m512 score = _mm512_mask_mov_ps(_mm512_loadu_ps(scores + 16 * jv), outside, minus_infinity);
        _mm512_storeu_ps(scores + 16 * jv, score);
        maximum = _mm512_max_ps(maximum, score);
    }
    float row_maximum = _mm512_reduce_max_ps(maximum);
    __m512 shift = _mm512_set1_ps(row_maximum == -INFINITY ? 0.0f : row_maximum);
    for (int64_t jv = 0; jv < vectors; jv++) {
        __m512 weight = exp_nonpositive_vector(_mm512_sub_ps(_mm512_loadu_ps(scores + 16 * jv), shift));
        _mm512_storeu_ps(scores + 16 * jv, weight);
        total = _mm512_add_ps(total, weight);
    }
    __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    for (int64_t jv = 0; jv < vectors; jv++)
        store_bf16_rounded(weight_row + 16 * jv, _mm512_mul_ps(_mm512_loadu_ps(scores + 16 * jv), inverse), 0xFFFF);
}

/* The AMX_ROWS rows of a block of sums (head_size wide, fp32) as bf16 rows `row_stride` apart. */
static inline void store_block_rows(const float *sums, int64_t head_size, uint16_t *target, int64_t row_stride) {
    for (int r = 0; r < AMX_ROWS; r++)
        for (int64_t dv = 0; dv < head_size / 16; dv++)
            store_bf16_rounded(target + r * row_stride + 16 * dv, _mm512_loadu_ps(sums + r * head_size + 16 * dv), 0xFFFF);
}
#endif

/* Forward. qkv (B, T, 3, H, Dh) bf16 → out (B, T, H, Dh) bf16 and weights (B, H, T, PADDED(T)) bf16, each row's
 * weights followed by zeros (not written if NULL).  scales[h] multiplies
 * head h's queries (rounded to bf16, as `query * scale` is); mask_diagonal leaves out each token's own score.
 * drop_threshold > 0: attention dropout (see the top of this file) with drop_scale and drop_key; the weights written
 * are those before it. */
void vitlab_attention_forward(const uint16_t *qkv, uint16_t *out, uint16_t *weights, int64_t batch, int64_t tokens,
                              int64_t heads, int64_t head_size, const float *scales, int mask_diagonal,
                              uint32_t drop_threshold, float drop_scale, uint64_t drop_key, int threads) {
    Dropout dropout = {drop_threshold, drop_scale, drop_key};
    int64_t qkv_row = 3 * heads * head_size, out_row = heads * head_size, padded = PADDED(tokens);
#ifdef VITLAB_AMX
    int tiles = amx_ready(); /* weights · V (and Q Kᵀ for heads of 32 and more) on AMX tiles, 16 rows at a time */
#endif
#pragma omp parallel num_threads(threads)
    {
        /* Each phase below reads what an earlier phase wrote, never what the previous instruction stored (a load
         * that overlaps a narrower pending store waits for it to reach the cache). */
        uint32_t *key_pairs = malloc(sizeof(uint32_t) * (MAX_HEAD / 2) * MAX_TOKENS);
        /* zeroed: the tiles read value pairs up to PADDED(T) / 2, beyond the (T + 1) / 2 that packing writes */
        uint32_t *value_pairs = calloc((MAX_TOKENS / 2) * MAX_HEAD, sizeof(uint32_t));
#ifdef VITLAB_AMX
        float mixed_block[AMX_ROWS * MAX_HEAD];
        float *score_block = malloc(sizeof(float) * AMX_ROWS * MAX_TOKENS);
        if (tiles)
            configure_tiles(1); /* depth 32 at a time in tiles 4 and 6, a last 16 in 5 and 7 */
#endif
        uint16_t *scaled_queries = malloc(sizeof(uint16_t) * MAX_TOKENS * MAX_HEAD);
        uint16_t *weight_buffer = malloc(sizeof(uint16_t) * MAX_TOKENS * (MAX_TOKENS + 16)); /* rows padded with zeros */
        int64_t buffer_row = MAX_TOKENS + 16;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < batch * heads; item++) {
            int64_t image = item / heads, head = item % heads;
            const uint16_t *first_row = qkv + image * tokens * qkv_row + head * head_size;
            Rows query = {first_row, qkv_row}, key = {first_row + out_row, qkv_row}, value = {first_row + 2 * out_row, qkv_row};
            pack_pairs_by_column(key, tokens, head_size, key_pairs);
            pack_pairs_by_row(value, tokens, head_size, 1.0f, value_pairs);
            __m512 scale = _mm512_set1_ps(scales[head]);
            for (int64_t i = 0; i < tokens; i++)
                for (int64_t d = 0; d < head_size; d += 16)
                    store_bf16_rounded(scaled_queries + i * MAX_HEAD + d, _mm512_mul_ps(load_bf16(query.base + i * query.row_stride + d, 0xFFFF), scale), 0xFFFF);
            /* The weights go straight into the kept rows (padded with zeros, as P V reads them) or, without, the buffer. */
            uint16_t *weight_rows = weights == NULL ? weight_buffer : weights + item * tokens * padded;
            int64_t weight_row = weights == NULL ? buffer_row : padded;
            int64_t i = 0;
#ifdef VITLAB_AMX
            /* Heads of 32 features and more: at 16 the tiles' half-filled products ran no faster than the vector code. The
             * last block's rows beyond T are computed and not used. */
            for (; tiles && head_size >= 32 && i < tokens; i += AMX_ROWS) {
                scores_block_on_tiles(scaled_queries + i * MAX_HEAD, key_pairs, tokens, head_size, score_block);
                for (int64_t r = 0; r < AMX_ROWS && i + r < tokens; r++)
                    scores_to_weights(score_block + r * MAX_TOKENS, tokens, mask_diagonal ? i + r : -1,
                                      weight_rows + (i + r) * weight_row);
            }
#endif
            if (i == 0 && two_rows_at_a_time(tokens)) {
                paired_query_rows_to_weights(scaled_queries, key_pairs, tokens, head_size, mask_diagonal, weight_rows, weight_row);
                i = tokens / 2 * 2;
            }
            for (; i < tokens; i++)
                query_row_to_weights(scaled_queries + i * MAX_HEAD, key_pairs, tokens, head_size, mask_diagonal ? i : -1,
                                     weight_rows + i * weight_row);
            const uint16_t *mixing_rows = weight_rows; /* the weights P V uses: P, or P' with dropout (in the buffer) */
            int64_t mixing_row = weight_row;
            if (dropout.threshold > 0) {
                for (int64_t row = 0; row < tokens; row++)
                    drop_row(weight_rows + row * weight_row, weight_buffer + row * buffer_row, dropout, item, row, tokens);
                mixing_rows = weight_buffer;
                mixing_row = buffer_row;
            }
            int64_t next = item + 1 < batch * heads ? item + 1 : -1; /* this thread's next item, mostly */
            const uint16_t *next_first = next < 0 ? NULL : qkv + next / heads * tokens * qkv_row + next % heads * head_size;
            const uint16_t *next_starts[3] = {next_first, next_first == NULL ? NULL : next_first + out_row,
                                              next_first == NULL ? NULL : next_first + 2 * out_row};
            i = 0;
#ifdef VITLAB_AMX
            for (; tiles && i + AMX_ROWS <= tokens; i += AMX_ROWS) {
                fetch_rows(next_starts, 3, qkv_row, 2 * head_size, i, i + AMX_ROWS);
                mixing_block_on_tiles(mixing_rows + i * mixing_row, mixing_row, value_pairs, tokens, head_size, mixed_block);
                store_block_rows(mixed_block, head_size, out + (image * tokens + i) * out_row + head * head_size, out_row);
            }
#endif
            for (; i + ROW_BLOCK <= tokens; i += ROW_BLOCK) {
                fetch_rows(next_starts, 3, qkv_row, 2 * head_size, i, i + ROW_BLOCK);
                __m512 mixed[ROW_BLOCK][MAX_HEAD / 16];
                block_times_rows(mixing_rows + i * mixing_row, mixing_row / 2, 1, value_pairs, tokens, head_size, mixed);
                for (int r = 0; r < ROW_BLOCK; r++)
                    for (int64_t dv = 0; dv < head_size / 16; dv++)
                        store_bf16_rounded(out + (image * tokens + i + r) * out_row + head * head_size + 16 * dv, mixed[r][dv], 0xFFFF);
            }
            fetch_rows(next_starts, 3, qkv_row, 2 * head_size, i, tokens);
            for (; i < tokens; i++) {
                __m512 mixed[MAX_HEAD / 16];
                row_times_rows(mixing_rows + i * mixing_row, 1, value_pairs, tokens, head_size, mixed);
                for (int64_t dv = 0; dv < head_size / 16; dv++)
                    store_bf16_rounded(out + (image * tokens + i) * out_row + head * head_size + 16 * dv, mixed[dv], 0xFFFF);
            }
        }
        free(scaled_queries);
        free(weight_buffer);
        free(key_pairs);
        free(value_pairs);
#ifdef VITLAB_AMX
        free(score_block);
        if (tiles)
            _tile_release();
#endif
    }
}

/* Σ_d a[d] · b[d] over a head's features (bf16 rows), summed per lane in fp32 and then across the lanes. */
static inline float row_dot_product(const uint16_t *a, const uint16_t *b, int64_t head_size) {
    __m512 dot = _mm512_setzero_ps();
    for (int64_t dv = 0; dv < head_size / 16; dv++)
        dot = _mm512_fmadd_ps(load_bf16(a + 16 * dv, 0xFFFF), load_bf16(b + 16 * dv, 0xFFFF), dot);
    return _mm512_reduce_add_ps(dot);
}

/* Backward's dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)) for query rows i and i + 1 (i even), up to 8 vectors of 16 tokens:
 * both rows of dS are stored as bf16 (grad_score_rows, rows `buffer_row` apart) and, from the registers, as one row of
 * pairs (score_pairs), with P's two rows (P' with dropout) as pairs (probability_pairs): the layout pack_pairs_by_row
 * writes. The same bits as the one-row loop, which has to read the even row back from memory. */
#define DEFINE_TWO_GRAD_SCORE_ROWS(NAME, LIMIT, EXACT, TWO_ROWS_TIMES_COLUMNS, DROPPING)                                \
    static inline void NAME(Rows grad_rows, Rows out_rows, int64_t i, const uint32_t *value_pairs,                       \
                            const uint16_t *weight_rows, int64_t tokens, int64_t head_size, uint16_t *grad_score_rows,   \
                            int64_t buffer_row, uint32_t *score_pairs, uint32_t *probability_pairs, Dropout dropout,     \
                            int64_t item) {                                                                              \
        int64_t padded = PADDED(tokens), vectors = padded / 16;                                                          \
        __mmask16 keep[2][MAX_TOKENS / 16];                                                                              \
        __m512 drop_scale = _mm512_set1_ps(dropout.scale);                                                               \
        if (DROPPING) {                                                                                                  \
            row_keep_masks(dropout, item, i, tokens, keep[0]);                                                           \
            row_keep_masks(dropout, item, i + 1, tokens, keep[1]);                                                       \
        }                                                                                                                \
        const uint16_t *first = grad_rows.base + i * grad_rows.row_stride, *second = first + grad_rows.row_stride;       \
        __m512 row_dot[2] = {                                                                                            \
            _mm512_set1_ps(row_dot_product(first, out_rows.base + i * out_rows.row_stride, head_size)),                  \
            _mm512_set1_ps(row_dot_product(second, out_rows.base + (i + 1) * out_rows.row_stride, head_size))};          \
        __m512 grad_weights[2][LIMIT];                                                                                   \
        TWO_ROWS_TIMES_COLUMNS(first, second, value_pairs, padded, head_size, grad_weights);                             \
        const uint16_t *weight_row = weight_rows + i * padded;                                                           \
        _Pragma("GCC unroll 8") for (int jv = 0; jv < LIMIT; jv++) if (EXACT || jv < vectors) {                         \
            __mmask16 inside = tail_mask(tokens - 16 * jv);                                                              \
            __m512i weight_lanes[2], score_lanes[2];                                                                     \
            _Pragma("GCC unroll 2") for (int r = 0; r < 2; r++) {                                                       \
                weight_lanes[r] = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(inside, weight_row + r * padded + 16 * jv)); \
                __m512 weight = _mm512_castsi512_ps(_mm512_slli_epi32(weight_lanes[r], 16));                             \
                __m512 grad_weight = grad_weights[r][jv];                                                                \
                if (DROPPING) { /* dP = dP' · m / (1 − p); dV's weights are P' */                                        \
                    grad_weight = _mm512_maskz_mul_ps(keep[r][jv], grad_weight, drop_scale);                             \
                    weight_lanes[r] = _mm512_cvtepu16_epi32(                                                             \
                        (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_mul_ps(keep[r][jv], weight, drop_scale)));              \
                }                                                                                                        \
                __m256i score_bits = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(weight, _mm512_sub_ps(grad_weight, row_dot[r]))); \
                _mm256_storeu_si256((__m256i *)(grad_score_rows + r * buffer_row + 16 * jv), score_bits);                \
                score_lanes[r] = _mm512_cvtepu16_epi32(score_bits);                                                      \
            }                                                                                                            \
            _mm512_storeu_si512(score_pairs + 16 * jv, _mm512_or_si512(score_lanes[0], _mm512_slli_epi32(score_lanes[1], 16))); \
            _mm512_storeu_si512(probability_pairs + 16 * jv,                                                             \
                                _mm512_or_si512(weight_lanes[0], _mm512_slli_epi32(weight_lanes[1], 16)));               \
        }                                                                                                                \
    }
/* Each in two versions, without and with dropout (the test is decided at compile time). */
DEFINE_TWO_GRAD_SCORE_ROWS(two_grad_score_rows_4, 4, 0, two_rows_times_columns_4, 0)
DEFINE_TWO_GRAD_SCORE_ROWS(two_grad_score_rows_exactly_5, 5, 1, two_rows_times_columns_exactly_5, 0)
DEFINE_TWO_GRAD_SCORE_ROWS(two_grad_score_rows_8, 8, 0, two_rows_times_columns_8, 0)
DEFINE_TWO_GRAD_SCORE_ROWS(dropped_two_grad_score_rows_4, 4, 0, two_rows_times_columns_4, 1)
DEFINE_TWO_GRAD_SCORE_ROWS(dropped_two_grad_score_rows_exactly_5, 5, 1, two_rows_times_columns_exactly_5, 1)
DEFINE_TWO_GRAD_SCORE_ROWS(dropped_two_grad_score_rows_8, 8, 0, two_rows_times_columns_8, 1)

/* Backward's dS row i (from dO Vᵀ, or its row in `products` where not NULL, P and rowsum(dO ⊙ O)) into grad_scores; at each odd i (or the last row) rows i - 1
 * and i of dS and P as pairs by row for dK and dV (pack_pairs_by_row's layout; the zeros beyond T come from the masked
 * loads), the even row read back from grad_scores. */
static inline __attribute__((always_inline)) void grad_score_row(Rows grad_rows, Rows out_rows, int64_t i,
                                                                  const uint32_t *value_pairs, const uint16_t *weight_rows,
                                                                  int64_t tokens, int64_t head_size, uint16_t *grad_scores,
                                                                  int64_t buffer_row, uint32_t *grad_score_pairs,
                                                                  uint32_t *weight_pairs, const int dropping, Dropout dropout,
                                                                  int64_t item, const float *products) {
    int64_t padded = PADDED(tokens);
    const uint16_t *grad_row = grad_rows.base + i * grad_rows.row_stride;
    __m512 row_dot = _mm512_set1_ps(row_dot_product(grad_row, out_rows.base + i * out_rows.row_stride, head_size));
    __m512 grad_weights[MAX_TOKENS / 16];
    if (products != NULL) /* dO Vᵀ's row, computed on the tiles */
        for (int64_t jv = 0; jv < padded / 16; jv++)
            grad_weights[jv] = _mm512_loadu_ps(products + 16 * jv);
    else
        row_times_columns(grad_row, value_pairs, tokens, head_size, grad_weights);
    uint16_t *grad_score_row = grad_scores + i * buffer_row;
    const uint16_t *weight_row = weight_rows + i * padded;
    if (i + PREFETCH_ROWS < tokens) /* the forward wrote these weights long ago: out of the caches by now */
        for (int64_t byte = 0; byte < 2 * padded; byte += 64)
            _mm_prefetch((const char *)(weight_row + PREFETCH_ROWS * padded) + byte, _MM_HINT_T0);
    int odd = i % 2 == 1, last = i == tokens - 1;
    uint32_t *score_pairs = grad_score_pairs + i / 2 * padded, *probability_pairs = weight_pairs + i / 2 * padded;
    __mmask16 keep[MAX_TOKENS / 16], keep_even[MAX_TOKENS / 16];
    __m512 drop_scale = _mm512_set1_ps(dropout.scale);
    if (dropping) {
        row_keep_masks(dropout, item, i, tokens, keep);
        if (odd)
            row_keep_masks(dropout, item, i - 1, tokens, keep_even);
    }
    for (int64_t jv = 0; jv < padded / 16; jv++) {
        __mmask16 inside = tail_mask(tokens - 16 * jv);
        __m512i weight_lanes = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(inside, weight_row + 16 * jv));
        __m512 weight = _mm512_castsi512_ps(_mm512_slli_epi32(weight_lanes, 16)), grad_weight = grad_weights[jv];
        if (dropping) { /* dP = dP' · m / (1 − p); dV's weights are P' */
            grad_weight = _mm512_maskz_mul_ps(keep[jv], grad_weight, drop_scale);
            weight_lanes = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_maskz_mul_ps(keep[jv], weight, drop_scale)));
        }
        __m256i score_bits = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(weight, _mm512_sub_ps(grad_weight, row_dot)));
        _mm256_storeu_si256((__m256i *)(grad_score_row + 16 * jv), score_bits);
        __m512i score_lanes = _mm512_cvtepu16_epi32(score_bits);
        if (odd) {
            __m512i even_scores = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(grad_score_row - buffer_row + 16 * jv)));
            __m512i even_weights = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(inside, weight_row - padded + 16 * jv));
            if (dropping)
                even_weights = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_maskz_mul_ps(
                    keep_even[jv], _mm512_castsi512_ps(_mm512_slli_epi32(even_weights, 16)), drop_scale)));
            _mm512_storeu_si512(score_pairs + 16 * jv, _mm512_or_si512(even_scores, _mm512_slli_epi32(score_lanes, 16)));
            _mm512_storeu_si512(probability_pairs + 16 * jv, _mm512_or_si512(even_weights, _mm512_slli_epi32(weight_lanes, 16)));
        } else if (last) { /* odd T: the last row pairs with zeros */
            _mm512_storeu_si512(score_pairs + 16 * jv, score_lanes);
            _mm512_storeu_si512(probability_pairs + 16 * jv, weight_lanes);
        }
    }
}

/* dS and its pairs for rows 0 .. 2⌊T/2⌋ - 1, two rows at a time (T <= 128; the caller does the last row of an odd T).
 * Not inlined, for the reason paired_query_rows_to_weights is not. */
__attribute__((noinline)) static void paired_grad_score_rows(Rows grad_rows, Rows out_rows, const uint32_t *value_pairs,
                                                             const uint16_t *weight_rows, int64_t tokens, int64_t head_size,
                                                             uint16_t *grad_scores, int64_t buffer_row,
                                                             uint32_t *grad_score_pairs, uint32_t *weight_pairs,
                                                             Dropout dropout, int64_t item) {
    int64_t padded = PADDED(tokens);
    int dropping = dropout.threshold > 0;
    for (int64_t i = 0; i + 2 <= tokens; i += 2) {
        uint16_t *score_rows = grad_scores + i * buffer_row;
        uint32_t *score_pairs = grad_score_pairs + i / 2 * padded, *probability_pairs = weight_pairs + i / 2 * padded;
#define TWO_ROWS(NAME) NAME(grad_rows, out_rows, i, value_pairs, weight_rows, tokens, head_size, score_rows, buffer_row, \
                            score_pairs, probability_pairs, dropout, item)
        if (padded <= 4 * 16) {
            if (dropping) TWO_ROWS(dropped_two_grad_score_rows_4); else TWO_ROWS(two_grad_score_rows_4);
        } else if (padded == 5 * 16) {
            if (dropping) TWO_ROWS(dropped_two_grad_score_rows_exactly_5); else TWO_ROWS(two_grad_score_rows_exactly_5);
        } else {
            if (dropping) TWO_ROWS(dropped_two_grad_score_rows_8); else TWO_ROWS(two_grad_score_rows_8);
        }
#undef TWO_ROWS
    }
}

#ifdef VITLAB_AMX
#define ROUNDED_PAIRS(tokens) (((tokens) + 1) / 2 + 15) / 16 * 16 /* the (T + 1) / 2 pairs of rows, up to a multiple of 16 */

/* transposed[j][p] = pairs[p][j] (uint32) for p < ROUNDED_PAIRS(T) and j < PADDED(T): the dS or P pairs by row
 * (rows p < (T + 1) / 2 written, PADDED(T) apart) as rows j of pairs along the queries, the layout the tiles' first
 * operand of dSᵀ Q and Pᵀ dO reads; zero for p >= (T + 1) / 2. In blocks of 16 × 16 in registers. */
static void transpose_pairs(const uint32_t *pairs, int64_t tokens, uint32_t *transposed) {
    int64_t padded = PADDED(tokens), written = (tokens + 1) / 2, width = ROUNDED_PAIRS(tokens);
    for (int64_t p0 = 0; p0 < width; p0 += 16)
        for (int64_t j0 = 0; j0 < padded; j0 += 16) {
            __m512i rows[16], lows[16], columns[4][4];
            for (int r = 0; r < 16; r++)
                rows[r] = p0 + r < written ? _mm512_loadu_si512(pairs + (p0 + r) * padded + j0) : _mm512_setzero_si512();
            for (int r = 0; r < 16; r += 2) { /* lane L: (row r, r + 1) of columns 4L, 4L + 1 | 4L + 2, 4L + 3 */
                lows[r] = _mm512_unpacklo_epi32(rows[r], rows[r + 1]);
                lows[r + 1] = _mm512_unpackhi_epi32(rows[r], rows[r + 1]);
            }
            for (int g = 0; g < 4; g++) { /* columns[g][k], lane L: rows 4g .. 4g + 3 of column 4L + k */
                columns[g][0] = _mm512_unpacklo_epi64(lows[4 * g], lows[4 * g + 2]);
                columns[g][1] = _mm512_unpackhi_epi64(lows[4 * g], lows[4 * g + 2]);
                columns[g][2] = _mm512_unpacklo_epi64(lows[4 * g + 1], lows[4 * g + 3]);
                columns[g][3] = _mm512_unpackhi_epi64(lows[4 * g + 1], lows[4 * g + 3]);
            }
            for (int k = 0; k < 4; k++) {
                __m512i first_low = _mm512_shuffle_i32x4(columns[0][k], columns[1][k], 0x44);
                __m512i first_high = _mm512_shuffle_i32x4(columns[0][k], columns[1][k], 0xEE);
                __m512i second_low = _mm512_shuffle_i32x4(columns[2][k], columns[3][k], 0x44);
                __m512i second_high = _mm512_shuffle_i32x4(columns[2][k], columns[3][k], 0xEE);
                uint32_t *target = transposed + (j0 + k) * width + p0;
                _mm512_storeu_si512(target, _mm512_shuffle_i32x4(first_low, second_low, 0x88));
                _mm512_storeu_si512(target + 4 * width, _mm512_shuffle_i32x4(first_low, second_low, 0xDD));
                _mm512_storeu_si512(target + 8 * width, _mm512_shuffle_i32x4(first_high, second_high, 0x88));
                _mm512_storeu_si512(target + 12 * width, _mm512_shuffle_i32x4(first_high, second_high, 0xDD));
            }
        }
}
#endif

/* dQ's row = scale · d(scaled Q)'s row (stored as bf16 at target); returns query · d(scaled Q), the row's share of the
 * scale's gradient. */
static inline float finish_grad_query_row(const uint16_t *query_row, const __m512 *grad_query, int64_t head_size, float scale,
                                          uint16_t *target) {
    __m512 scale_dot = _mm512_setzero_ps();
    for (int64_t dv = 0; dv < head_size / 16; dv++) {
        scale_dot = _mm512_fmadd_ps(load_bf16(query_row + 16 * dv, 0xFFFF), grad_query[dv], scale_dot);
        store_bf16_rounded(target + 16 * dv, _mm512_mul_ps(grad_query[dv], _mm512_set1_ps(scale)), 0xFFFF);
    }
    return _mm512_reduce_add_ps(scale_dot);
}

/* Backward. From qkv, the forward's out and padded weights, and grad_out (B, T, H, Dh): grad_qkv (B, T, 3, H, Dh) and
 * grad_scale_sums (B, H): Σ over the item's queries of query · dL/d(scaled query), the gradient of scales[h] from
 * image b. With S = scale · Q Kᵀ, P = softmax(S), O = P V:
 *   dP = dO Vᵀ,  dS = P ⊙ (dP − rowsum(dO ⊙ O)),  d(scaled Q) = dS K,  dQ = scale · d(scaled Q),
 *   dK = dSᵀ (scaled Q),  dV = Pᵀ dO;
 * with dropout (the forward's threshold, scale and key) as at the top of this file. */
void vitlab_attention_backward(const uint16_t *qkv, const uint16_t *out, const uint16_t *weights, const uint16_t *grad_out,
                               uint16_t *grad_qkv, float *grad_scale_sums, int64_t batch, int64_t tokens, int64_t heads,
                               int64_t head_size, const float *scales, uint32_t drop_threshold, float drop_scale,
                               uint64_t drop_key, int threads) {
    Dropout dropout = {drop_threshold, drop_scale, drop_key};
    int64_t qkv_row = 3 * heads * head_size, out_row = heads * head_size, padded = PADDED(tokens);
#ifdef VITLAB_AMX
    int tiles = amx_ready(); /* dS K, dSᵀ Q and Pᵀ dO (and dO Vᵀ for heads of 32 and more) on AMX tiles, 16 rows at a time */
#endif
#pragma omp parallel num_threads(threads)
    {
        uint32_t *value_pairs = malloc(sizeof(uint32_t) * (MAX_HEAD / 2) * MAX_TOKENS);      /* by column: dO Vᵀ */
        /* by row: dS K; zeroed, as the tiles read pairs up to PADDED(T) / 2 */
        uint32_t *key_pairs = calloc((MAX_TOKENS / 2) * MAX_HEAD, sizeof(uint32_t));
#ifdef VITLAB_AMX
        float grad_block[AMX_ROWS * MAX_HEAD];
        float *product_block = tiles ? malloc(sizeof(float) * AMX_ROWS * MAX_TOKENS) : NULL;   /* dO Vᵀ, 16 rows */
        uint16_t *grad_out_rows = tiles ? malloc(sizeof(uint16_t) * MAX_TOKENS * MAX_HEAD) : NULL; /* dO, rows MAX_HEAD apart */
        int64_t rounded_pairs = ROUNDED_PAIRS(MAX_TOKENS);
        uint32_t *score_columns = tiles ? malloc(sizeof(uint32_t) * MAX_TOKENS * rounded_pairs) : NULL;  /* dS's pairs, transposed */
        uint32_t *weight_columns = tiles ? malloc(sizeof(uint32_t) * MAX_TOKENS * rounded_pairs) : NULL; /* P's pairs, transposed */
        if (tiles)
            configure_tiles(1); /* depth 32 at a time in tiles 4 and 6, a last 16 in 5 and 7 */
#endif
        /* by row: dSᵀ Q and Pᵀ dO; zeroed, as the tiles read pairs up to ROUNDED_PAIRS(T) */
        uint32_t *query_pairs = calloc((MAX_TOKENS / 2 + 16) * MAX_HEAD, sizeof(uint32_t));
        uint32_t *grad_out_pairs = calloc((MAX_TOKENS / 2 + 16) * MAX_HEAD, sizeof(uint32_t));
        uint16_t *grad_scores = malloc(sizeof(uint16_t) * MAX_TOKENS * (MAX_TOKENS + 16));       /* dS, rows i */
        uint32_t *grad_score_pairs = malloc(sizeof(uint32_t) * (MAX_TOKENS / 2 + 1) * MAX_TOKENS); /* dS by row */
        uint32_t *weight_pairs = malloc(sizeof(uint32_t) * (MAX_TOKENS / 2 + 1) * MAX_TOKENS);     /* P by row */
        int64_t buffer_row = MAX_TOKENS + 16;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < batch * heads; item++) {
            int64_t image = item / heads, head = item % heads;
            float scale = scales[head];
            const uint16_t *first_row = qkv + image * tokens * qkv_row + head * head_size;
            Rows query = {first_row, qkv_row}, key = {first_row + out_row, qkv_row}, value = {first_row + 2 * out_row, qkv_row};
            Rows grad_rows = {grad_out + image * tokens * out_row + head * head_size, out_row};
            Rows out_rows = {out + image * tokens * out_row + head * head_size, out_row};
            uint16_t *grad_first = grad_qkv + image * tokens * qkv_row + head * head_size;
            pack_pairs_by_column(value, tokens, head_size, value_pairs);
            pack_pairs_by_row(key, tokens, head_size, 1.0f, key_pairs);
            pack_pairs_by_row(query, tokens, head_size, scale, query_pairs);
            pack_pairs_by_row(grad_rows, tokens, head_size, 1.0f, grad_out_pairs);
            const uint16_t *weight_rows = weights + item * tokens * padded;
#ifdef VITLAB_AMX
            if (tiles && head_size >= 32) { /* dO Vᵀ on the tiles, 16 rows at a time, as the forward's scores */
                for (int64_t i = 0; i < tokens; i++)
                    memcpy(grad_out_rows + i * MAX_HEAD, grad_rows.base + i * grad_rows.row_stride, 2 * head_size);
                for (int64_t i = 0; i < tokens; i += AMX_ROWS) {
                    scores_block_on_tiles(grad_out_rows + i * MAX_HEAD, value_pairs, tokens, head_size, product_block);
                    for (int64_t r = 0; r < AMX_ROWS && i + r < tokens; r++)
                        grad_score_row(grad_rows, out_rows, i + r, value_pairs, weight_rows, tokens, head_size, grad_scores,
                                       buffer_row, grad_score_pairs, weight_pairs, dropout.threshold > 0, dropout, item,
                                       product_block + r * MAX_TOKENS);
                }
            } else
#endif
            if (two_rows_at_a_time(tokens)) {
                paired_grad_score_rows(grad_rows, out_rows, value_pairs, weight_rows, tokens, head_size, grad_scores, buffer_row,
                                       grad_score_pairs, weight_pairs, dropout, item);
                if (tokens % 2 == 1)
                    grad_score_row(grad_rows, out_rows, tokens - 1, value_pairs, weight_rows, tokens, head_size, grad_scores,
                                   buffer_row, grad_score_pairs, weight_pairs, dropout.threshold > 0, dropout, item, NULL);
            } else if (dropout.threshold > 0) { /* two copies of the loop: the test decided at compile time in each */
                for (int64_t i = 0; i < tokens; i++)
                    grad_score_row(grad_rows, out_rows, i, value_pairs, weight_rows, tokens, head_size, grad_scores, buffer_row,
                                   grad_score_pairs, weight_pairs, 1, dropout, item, NULL);
            } else {
                for (int64_t i = 0; i < tokens; i++)
                    grad_score_row(grad_rows, out_rows, i, value_pairs, weight_rows, tokens, head_size, grad_scores, buffer_row,
                                   grad_score_pairs, weight_pairs, 0, dropout, item, NULL);
            }
            /* d(scaled Q) = dS K, ROW_BLOCK rows at a time; dQ = scale · that, and the scale's gradient from it. */
            float scale_sum = 0.0f;
            int64_t i = 0;
#ifdef VITLAB_AMX
            for (; tiles && i + AMX_ROWS <= tokens; i += AMX_ROWS) {
                mixing_block_on_tiles(grad_scores + i * buffer_row, buffer_row, key_pairs, tokens, head_size, grad_block);
                for (int r = 0; r < AMX_ROWS; r++) {
                    __m512 grad_query[MAX_HEAD / 16];
                    for (int64_t dv = 0; dv < head_size / 16; dv++)
                        grad_query[dv] = _mm512_loadu_ps(grad_block + r * head_size + 16 * dv);
                    scale_sum += finish_grad_query_row(query.base + (i + r) * query.row_stride, grad_query, head_size, scale,
                                                       grad_first + (i + r) * qkv_row);
                }
            }
#endif
            for (; i < tokens; i += ROW_BLOCK) {
                int64_t block = tokens - i < ROW_BLOCK ? tokens - i : ROW_BLOCK;
                __m512 grad_queries[ROW_BLOCK][MAX_HEAD / 16];
                if (block == ROW_BLOCK)
                    block_times_rows(grad_scores + i * buffer_row, buffer_row / 2, 1, key_pairs, tokens, head_size, grad_queries);
                else
                    for (int64_t r = 0; r < block; r++)
                        row_times_rows(grad_scores + (i + r) * buffer_row, 1, key_pairs, tokens, head_size, grad_queries[r]);
                for (int64_t r = 0; r < block; r++)
                    scale_sum += finish_grad_query_row(query.base + (i + r) * query.row_stride, grad_queries[r], head_size, scale,
                                                       grad_first + (i + r) * qkv_row);
            }
            /* dK and dV sum over the queries i: dS and P as pairs of rows (written above), read down their columns j. */
            int64_t next = item + 1 < batch * heads ? item + 1 : -1; /* this thread's next item, mostly */
            int64_t next_image = next / heads, next_head = next % heads;
            const uint16_t *next_first = next < 0 ? NULL : qkv + next_image * tokens * qkv_row + next_head * head_size;
            const uint16_t *next_qkv[3] = {next_first, next_first == NULL ? NULL : next_first + out_row,
                                           next_first == NULL ? NULL : next_first + 2 * out_row};
            const uint16_t *next_outs[2] = {next < 0 ? NULL : grad_out + next_image * tokens * out_row + next_head * head_size,
                                            next < 0 ? NULL : out + next_image * tokens * out_row + next_head * head_size};
            int64_t j = 0;
#ifdef VITLAB_AMX
            if (tiles && tokens >= AMX_ROWS) {
                int64_t width = ROUNDED_PAIRS(tokens);
                transpose_pairs(grad_score_pairs, tokens, score_columns);
                transpose_pairs(weight_pairs, tokens, weight_columns);
                for (; j + AMX_ROWS <= tokens; j += AMX_ROWS) {
                    fetch_rows(next_qkv, 3, qkv_row, 2 * head_size, j, j + AMX_ROWS);
                    fetch_rows(next_outs, 2, out_row, 2 * head_size, j, j + AMX_ROWS);
                    const uint16_t *sources[2] = {(const uint16_t *)(score_columns + j * width), (const uint16_t *)(weight_columns + j * width)};
                    const uint32_t *operands[2] = {query_pairs, grad_out_pairs};
                    for (int m = 0; m < 2; m++) { /* dK = dSᵀ (scaled Q), then dV = P'ᵀ dO */
                        mixing_block_on_tiles(sources[m], 2 * width, operands[m], 2 * width, head_size, grad_block);
                        store_block_rows(grad_block, head_size, grad_first + j * qkv_row + (m + 1) * out_row, qkv_row);
                    }
                }
            }
#endif
            for (; j + ROW_BLOCK <= tokens; j += ROW_BLOCK) {
                fetch_rows(next_qkv, 3, qkv_row, 2 * head_size, j, j + ROW_BLOCK);
                fetch_rows(next_outs, 2, out_row, 2 * head_size, j, j + ROW_BLOCK);
                __m512 results[ROW_BLOCK][MAX_HEAD / 16];
                block_times_rows(grad_score_pairs + j, 1, padded, query_pairs, tokens, head_size, results);
                for (int r = 0; r < ROW_BLOCK; r++)
                    for (int64_t dv = 0; dv < head_size / 16; dv++)
                        store_bf16_rounded(grad_first + (j + r) * qkv_row + out_row + 16 * dv, results[r][dv], 0xFFFF);
                block_times_rows(weight_pairs + j, 1, padded, grad_out_pairs, tokens, head_size, results);
                for (int r = 0; r < ROW_BLOCK; r++)
                    for (int64_t dv = 0; dv < head_size / 16; dv++)
                        store_bf16_rounded(grad_first + (j + r) * qkv_row + 2 * out_row + 16 * dv, results[r][dv], 0xFFFF);
            }
            fetch_rows(next_qkv, 3, qkv_row, 2 * head_size, j, tokens);
            fetch_rows(next_outs, 2, out_row, 2 * head_size, j, tokens);
            for (; j < tokens; j++) {
                __m512 result[MAX_HEAD / 16];
                row_times_rows(grad_score_pairs + j, padded, query_pairs, tokens, head_size, result);
                for (int64_t dv = 0; dv < head_size / 16; dv++)
                    store_bf16_rounded(grad_first + j * qkv_row + out_row + 16 * dv, result[dv], 0xFFFF);
                row_times_rows(weight_pairs + j, padded, grad_out_pairs, tokens, head_size, result);
                for (int64_t dv = 0; dv < head_size / 16; dv++)
                    store_bf16_rounded(grad_first + j * qkv_row + 2 * out_row + 16 * dv, result[dv], 0xFFFF);
            }
            grad_scale_sums[item] = scale_sum;
        }
        free(value_pairs);
        free(key_pairs);
        free(query_pairs);
        free(grad_out_pairs);
        free(grad_scores);
        free(grad_score_pairs);
        free(weight_pairs);
#ifdef VITLAB_AMX
        free(score_columns);
        free(weight_columns);
        free(product_block);
        free(grad_out_rows);
        if (tiles)
            _tile_release();
#endif
    }
}

#else

int vitlab_attention_supported(void) { return 0; }

void vitlab_attention_forward(const uint16_t *qkv, uint16_t *out, uint16_t *weights, int64_t batch, int64_t tokens,
                              int64_t heads, int64_t head_size, const float *scales, int mask_diagonal,
                              uint32_t drop_threshold, float drop_scale, uint64_t drop_key, int threads) {
    (void)qkv, (void)out, (void)weights, (void)batch, (void)tokens, (void)heads, (void)head_size, (void)scales;
    (void)mask_diagonal, (void)drop_threshold, (void)drop_scale, (void)drop_key, (void)threads;
    abort(); /* callers check vitlab_attention_supported() first */
}

void vitlab_attention_backward(const uint16_t *qkv, const uint16_t *out, const uint16_t *weights, const uint16_t *grad_out,
                               uint16_t *grad_qkv, float *grad_scale_sums, int64_t batch, int64_t tokens, int64_t heads,
                               int64_t head_size, const float *scales, uint32_t drop_threshold, float drop_scale,
                               uint64_t drop_key, int threads) {
    (void)qkv, (void)out, (void)weights, (void)grad_out, (void)grad_qkv, (void)grad_scale_sums, (void)batch, (void)tokens;
    (void)heads, (void)head_size, (void)scales, (void)drop_threshold, (void)drop_scale, (void)drop_key, (void)threads;
    abort();
}

#endif

int64_t vitlab_attention_max_tokens(void) { return MAX_TOKENS; }
int64_t vitlab_attention_max_head_size(void) { return MAX_HEAD; }
