/* The AVX2 half of common.h: fp16 values and scales, sums and dot products 8 floats at a time, the
 * pause of a spinning wait, and denormals flushed to zero. */
#pragma once

INLINE float h2f(uint16_t h) { return _cvtsh_ss(h); }

INLINE float scale_at(const void *s, int s16, i64 i) {
    return s16 ? h2f(((const uint16_t *)s)[i]) : ((const float *)s)[i];
}

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

/* 8 scales starting at index i, as floats */
INLINE __m256 scales8(const void *s, int s16, i64 i) {
    return s16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)s + i)))
               : _mm256_loadu_ps((const float *)s + i);
}

INLINE float dot(const float *a, const float *b, i64 n) {
    i64 i = 0;
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float total = hsum(acc);
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

/* comb[b] = s[b / bpg] * xd[b] for the nb blocks of one row and one token */
INLINE void block_multipliers(const void *s, int s16, i64 bpg, i64 nb, const float *xd, float *comb) {
    i64 b = 0;
    if (bpg == 1) {
        for (; b + 8 <= nb; b += 8) _mm256_storeu_ps(comb + b, _mm256_mul_ps(scales8(s, s16, b), _mm256_loadu_ps(xd + b)));
    } else if (bpg == 2 || bpg == 4) {
        const __m256i idx = bpg == 2 ? _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3) : _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
        for (; b + 8 <= nb; b += 8) {
            /* the 8 / bpg scales of these 8 blocks, spread */
            const void *p = (const char *)s + (b / bpg) * (s16 ? 2 : 4);
            __m128 few = s16 ? _mm_cvtph_ps(bpg == 2 ? _mm_loadl_epi64((const __m128i *)p) : _mm_loadu_si32(p))
                             : (bpg == 2 ? _mm_loadu_ps((const float *)p) : _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)p)));
            __m256 sv = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(few), idx);
            _mm256_storeu_ps(comb + b, _mm256_mul_ps(sv, _mm256_loadu_ps(xd + b)));
        }
    } else if (bpg % 8 == 0) {
        for (; b < nb; b += 8)
            _mm256_storeu_ps(comb + b, _mm256_mul_ps(_mm256_set1_ps(scale_at(s, s16, b / bpg)), _mm256_loadu_ps(xd + b)));
    }
    for (i64 gi = b / bpg; b < nb; gi++) { /* what is left, one group at a time */
        float sg = scale_at(s, s16, gi);
        for (i64 j = 0; j < bpg; j++, b++) comb[b] = sg * xd[b];
    }
}

/* sum over i < n of s[i] * v[i] */
INLINE float scaled_sum(const void *s, int s16, i64 n, const float *v) {
    i64 i = 0;
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(scales8(s, s16, i), _mm256_loadu_ps(v + i), acc);
    float total = hsum(acc);
    for (; i < n; i++) total += scale_at(s, s16, i) * v[i];
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
