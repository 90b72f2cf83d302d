/* The AVX2 half of common.h: fp16 values and scales, sums and dot products 8 floats at a time, the
 * pause of a spinning wait, and denormals flushed to zero. */
#pragma once

INLINE float h2f(uint16_t h) { return _cvtsh_ss(h); }
INLINE uint16_t f2h(float x) { return _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT); }

#ifndef HERD_AVX512
/* acc + the 8 sums of 4 adjacent products of a (unsigned bytes) and b (signed bytes); the products
   of a pair must fit in int16 (they do for int4 or |int8| weights against int8 activations) */
INLINE __m256i dot_us(__m256i acc, __m256i a, __m256i b) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
}
#endif

INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 weights at p as floats */
#define LOAD_F32(p) _mm256_loadu_ps(p)
#define LOAD_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define LOAD_BF16(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))

INLINE float dot(const float *a, const float *b, i64 n) {
    i64 i = 0;
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float total = hsum(acc);
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

INLINE void cpu_relax(void) { _mm_pause(); }

/* Flush denormals to zero (returning the old state): attention weights far below the largest are
   denormal, and arithmetic on denormals is ~100x slower. */
INLINE unsigned denormals_off(void) {
    unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);
    return csr;
}

INLINE void denormals_restore(unsigned csr) { _mm_setcsr(csr); }
