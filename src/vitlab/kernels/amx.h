/* AMX's tile configuration and Linux's permission to use the tiles, shared by the kernels that run products on them
 * (static inline: each kernel file has its copy). Defines VITLAB_AMX where the compiler targets AMX's bf16 tiles. */
#ifndef VITLAB_AMX_H
#define VITLAB_AMX_H

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <immintrin.h>

#define VITLAB_AMX 1
#define AMX_ROWS 16 /* the rows of a tile */

/* AMX's tile configuration (palette 1), laid out as `ldtilecfg` reads it. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} TileConfig;

/* Whether Linux gave this process AMX's tile state (asked once per kernel file: arch_prctl ARCH_REQ_XCOMP_PERM for
 * XTILEDATA); where it refuses, the caller runs other code. Called outside parallel regions. */
static inline int amx_ready(void) {
    static int state = 0; /* 0: not asked yet, 1: granted, -1: refused */
    if (state == 0)
        state = syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 1 : -1;
    return state == 1;
}

/* ldtilecfg written out: GCC 12's _tile_loadconfig tells the compiler it reads 8 bytes of the configuration, so below
 * -O3 the stores that fill it were dropped as dead and the tiles configured from stack garbage. */
static inline void load_tile_config(const TileConfig *config) {
    __asm__ volatile("ldtilecfg %0" : : "m"(*config) : "memory");
}

/* All eight tiles 16 rows of 64 bytes (palette 1); with `half_depth_tail`, tile 5 rows of 32 bytes and tile 7 eight
 * rows instead, for a product's last 16 of an odd number of 16s of depth. TILE_PRODUCTS' tiles: 0–3 sums (16 rows × 16
 * columns, fp32), 4 and 5 the first operand's rows (16 × 32 bf16 numbers of the depth, or 16 in tile 5 with the tail),
 * 6 and 7 the second's pairs (16 pairs × 16 columns, or 8 in tile 7 with the tail). */
static inline void configure_tiles(int half_depth_tail) {
    TileConfig config = {0};
    config.palette = 1;
    for (int tile = 0; tile < 8; tile++) {
        config.rows[tile] = AMX_ROWS;
        config.bytes_per_row[tile] = 64;
    }
    if (half_depth_tail) {
        config.bytes_per_row[5] = 32;
        config.rows[7] = AMX_ROWS / 2;
    }
    load_tile_config(&config);
}

/* Tiles: sums t (0 to COUNT - 1) += rows (tile A, A_BYTES apart) · pairs (tile B, B_BYTES apart), 16 pair columns
 * further for each t: the sums' 16 columns t. */
#define TILE_PRODUCTS(A, B, ROWS, A_BYTES, PAIRS, B_BYTES, COUNT)                                                        \
    do {                                                                                                                 \
        _tile_loadd(A, ROWS, A_BYTES);                                                                                   \
        _tile_loadd(B, PAIRS, B_BYTES);                                                                                  \
        _tile_dpbf16ps(0, A, B);                                                                                         \
        if ((COUNT) > 1) { _tile_loadd(B, (PAIRS) + 16, B_BYTES); _tile_dpbf16ps(1, A, B); }                             \
        if ((COUNT) > 2) { _tile_loadd(B, (PAIRS) + 32, B_BYTES); _tile_dpbf16ps(2, A, B); }                             \
        if ((COUNT) > 3) { _tile_loadd(B, (PAIRS) + 48, B_BYTES); _tile_dpbf16ps(3, A, B); }                             \
    } while (0)

/* The four sum tiles (0–3) set to zero, and the first COUNT of them stored to TARGET, 16 columns apart, BYTES per row. */
#define ZERO_SUM_TILES()                                                                                                 \
    do {                                                                                                                 \
        _tile_zero(0);                                                                                                   \
        _tile_zero(1);                                                                                                   \
        _tile_zero(2);                                                                                                   \
        _tile_zero(3);                                                                                                   \
    } while (0)
#define STORE_SUM_TILES(TARGET, BYTES, COUNT)                                                                            \
    do {                                                                                                                 \
        _tile_stored(0, TARGET, BYTES);                                                                                  \
        if ((COUNT) > 1) _tile_stored(1, (TARGET) + 16, BYTES);                                                          \
        if ((COUNT) > 2) _tile_stored(2, (TARGET) + 32, BYTES);                                                          \
        if ((COUNT) > 3) _tile_stored(3, (TARGET) + 48, BYTES);                                                          \
    } while (0)
#endif

#endif
