/* What every kernel file uses: the contract (kernels.h), forced inlining, prefetch, bf16 values, and
 * which instruction set this build targets (native.py builds one library per instruction set, each
 * with its own compiler flags): AVX-512 with VNNI (HERD_AVX512: the AVX2 code, with vpdpbusd for
 * the integer dot products), AVX2 with FMA and F16C (HERD_AVX2), or plain C (HERD_GENERIC, or a
 * CPU with neither). The instruction-set half of this file (avx2/common.h, avx512/common.h,
 * portable/common.h) holds the small arithmetic the kernels share: fp16 values, scales, sums and
 * dot products.
 */
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#if !defined(HERD_GENERIC) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define HERD_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define HERD_AVX512 1
#endif
#endif

#define INLINE static inline __attribute__((always_inline))
/* Weights are read as one pass over memory, and the hardware prefetcher alone falls behind: while a
   tile reads its two rows, prefetch the same place in the next tile's two rows (two rows on; past
   the end of the matrix a prefetch is harmless). Measured on 2 Zen 3 cores: int8 decode streaming
   9 -> 17 GB/s, TinyLlama int4 decode +10-15% over a fixed distance of 1.5 KB. */
#define PREFETCH(p) __builtin_prefetch(p)

INLINE float bf2f(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#ifdef HERD_AVX512
#include "avx512/common.h"
#endif
#ifdef HERD_AVX2
#include "avx2/common.h"
#else
#include "portable/common.h"
#endif

/* the sum of 8 lanes in the order of avx2/common.h's hsum (llama.cpp's hsum_float_8): the lanes of
   the integer kernels are summed this way on every path */
INLINE float hsum8(const float *l) { return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7])); }

/* x rounded to the nearest fp16 value (ties to even), as a float */
INLINE float fp16_round(float x) { return h2f(f2h(x)); }

/* a group's scale, stored as fp16 (s16) or fp32 */
INLINE float scale_at(const void *s, int s16, i64 i) {
    return s16 ? h2f(((const uint16_t *)s)[i]) : ((const float *)s)[i];
}
