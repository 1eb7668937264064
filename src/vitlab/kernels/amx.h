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
#endif

#endif
