/* bf16 conversions and the vector exp shared by vitlab's C kernels (static inline: each kernel file has its copy). */
#ifndef VITLAB_BF16_MATH_H
#define VITLAB_BF16_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

/* Round to nearest even, as PyTorch's float → bf16 conversion does; a NaN stays a (quiet) NaN. */
static inline uint16_t float_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    uint32_t quiet_nan = (bits >> 16) | 0x40u;
    return (uint16_t)(((bits & 0x7FFFFFFFu) > 0x7F800000u) ? quiet_nan : rounded);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define VITLAB_AVX512 1
#include <immintrin.h>

/* 16 bf16 numbers (those `mask` selects; 0 elsewhere) as fp32. */
static inline __m512 load_bf16(const uint16_t *source, __mmask16 mask) {
    __m256i bits = _mm256_maskz_loadu_epi16(mask, source);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

/* The 16 values rounded to bf16 as float_to_bf16 does, each number's 16 bits in the low half of its 32-bit lane. */
static inline __m512i bf16_bits(__m512 values) {
    __m512i bits = _mm512_castps_si512(values);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(values, values, _CMP_UNORD_Q);
    return _mm512_mask_or_epi32(rounded, nan, _mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
}

/* Store the lanes `mask` selects as bf16, rounded as float_to_bf16 does. */
static inline void store_bf16(uint16_t *target, __m512 values, __mmask16 mask) {
    _mm256_mask_storeu_epi16(target, mask, _mm512_cvtepi32_epi16(bf16_bits(values)));
}

/* store_bf16 by the CPU's own conversion where it has AVX-512 BF16 (vcvtneps2bf16: the same rounding, except that
 * numbers below bf16's smallest normal become 0), else store_bf16 itself. */
static inline void store_bf16_rounded(uint16_t *target, __m512 values, __mmask16 mask) {
#ifdef __AVX512BF16__
    _mm256_mask_storeu_epi16(target, mask, (__m256i)_mm512_cvtneps_pbh(values));
#else
    store_bf16(target, values, mask);
#endif
}

/* e^x for x <= 0 (scores minus their row maximum) on 16 lanes, for weights that end up rounded to bf16: 2^n · p(r)
 * with x = n ln 2 + r, |r| <= ln2 / 2, and p a degree-4 polynomial fitted for relative error on that interval (below
 * 3e-6 in fp32, as the degree-5 Taylor polynomial it replaced, with one multiply-add fewer; far below bf16's 2^-9).
 * Below -87 the result is 0 (fp32's e^x would still be a subnormal number down to about -104, far below any weight
 * bf16 keeps apart from 0); -inf gives 0 and a NaN stays NaN (max and the "not less than" comparison let NaN lanes
 * through). */
static inline __m512 exp_nonpositive_vector(__m512 x) {
    __m512 clamped = _mm512_max_ps(_mm512_set1_ps(-87.0f), x); /* x where x is NaN */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), clamped);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(4.151381925e-2f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.678747684e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.000301600e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.999668598e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    __mmask16 kept = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ); /* x >= -87 or NaN */
    return _mm512_maskz_scalef_ps(kept, p, n); /* p · 2^n, 0 below -87 */
}

/* The first `remaining` of 16 lanes (all 16 from 16 on). */
static inline __mmask16 tail_mask(int64_t remaining) {
    return remaining >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << remaining) - 1u);
}
#endif

#endif
