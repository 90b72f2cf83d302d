/* What every kernel file uses: the contract (kernels.h), forced inlining, prefetch, bf16 values, and
 * which instruction set this build targets: AVX2 (with FMA and F16C) when -march=native finds it,
 * plain C otherwise. The instruction-set half of this file (avx2/common.h, portable/common.h) holds
 * the small arithmetic the kernels share: fp16 values, scales, sums and dot products.
 */
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define HERD_AVX2 1
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

#ifdef HERD_AVX2
#include "avx2/common.h"
#else
#include "portable/common.h"
#endif

/* a group's scale, stored as fp16 (s16) or fp32 */
INLINE float scale_at(const void *s, int s16, i64 i) {
    return s16 ? h2f(((const uint16_t *)s)[i]) : ((const float *)s)[i];
}
