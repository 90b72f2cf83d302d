/* The AVX2 half of tiles.h. */
#pragma once

/* 8 scales starting at index i, as floats */
INLINE __m256 scales8(const void *s, int s16, i64 i) {
    return s16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)s + i)))
               : _mm256_loadu_ps((const float *)s + i);
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

/* NAME(w, K, R, x, C, out, ldo): R rows of T weights (read with LOAD, 8 at a time; PF: prefetch the
   next tile's rows) against C fp32 tokens */
#define FLOAT_TILE(NAME, T, LOAD, PF)                                                                 \
    INLINE void NAME(const T *w, i64 K, int R, const float *x, int C, float *out, i64 ldo) {         \
        __m256 a[2][MAXC], b[2][MAXC];                                                                \
        for (int r = 0; r < R; r++)                                                                   \
            for (int c = 0; c < C; c++) a[r][c] = b[r][c] = _mm256_setzero_ps();                     \
        for (i64 k = 0; k < K; k += 16) {                                                             \
            for (int r = 0; r < R; r++) {                                                             \
                __m256 w0 = LOAD(w + r * K + k), w1 = LOAD(w + r * K + k + 8);                        \
                if (PF) PREFETCH(w + (r + 2) * K + k);                                                \
                for (int c = 0; c < C; c++) {                                                         \
                    a[r][c] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + c * K + k), a[r][c]);           \
                    b[r][c] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + c * K + k + 8), b[r][c]);       \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
        for (int r = 0; r < R; r++)                                                                   \
            for (int c = 0; c < C; c++) out[c * ldo + r] = hsum(_mm256_add_ps(a[r][c], b[r][c]));    \
    }

/* The common case (groups of 32, at least 8 blocks), for one row and C tokens at once, 8 blocks at a
   time: comb[c * ldc + b] = s[b] * xd[c * nb + b] and, when m is given, acc[c] += 8 partial sums of
   f * m[b] * xg[c * nb + b] (folded into the row's accumulators instead of summed on their own). A
   last partial octet is read at nb - 8: its multipliers are written again, unchanged, and the
   offsets of the blocks already counted are masked out. Measured against block_multipliers and
   scaled_sum per token: SmolLM2-135M Q4_1 decode step -12 to -18%, 4-token step -22%. */
INLINE void multipliers_g32(const void *s, const void *m, float f, int s16, i64 nb, int C, const float *xd,
                            const float *xg, float *comb, i64 ldc, __m256 *acc) {
    const __m256 fv = _mm256_set1_ps(f);
    for (i64 b = 0; b < nb; b += 8) {
        i64 at = b + 8 <= nb ? b : nb - 8;
        __m256 sv = scales8(s, s16, at);
        for (int c = 0; c < C; c++) _mm256_storeu_ps(comb + c * ldc + at, _mm256_mul_ps(sv, _mm256_loadu_ps(xd + c * nb + at)));
        if (!m) continue;
        __m256 mv = _mm256_mul_ps(fv, scales8(m, s16, at));
        if (at != b)
            mv = _mm256_and_ps(mv, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                                                          _mm256_set1_epi32((int)(b - at - 1)))));
        for (int c = 0; c < C; c++) acc[c] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(xg + c * nb + at), acc[c]);
    }
}

/* q8: int8 weights with per-group scales (s points at row 0's scales; G per row). `half`: g = 16, so
   each block of 32 has two scales (lanes 0-3 of the block's integer sums cover its first 16 inputs,
   lanes 4-7 the other 16). The weights' and activations' scales are multiplied per row and token up
   front, so the inner loop is integer multiply-adds and one fused multiply-add per block. */
INLINE void tile_q8(const int8_t *w, const void *s, int s16, i64 g, i64 K, int R, const int8_t *xq,
                    const float *xd, int C, float *out, i64 ldo, int half) {
    i64 nb = K / 32, G = K / g, per = half ? 2 : 1;
    float comb[2][MAXC][per * nb];
    int fast = 0;
    if (g == 32 && nb >= 8) {
        fast = 1;
        for (int r = 0; r < R; r++)
            multipliers_g32((const char *)s + r * G * (s16 ? 2 : 4), NULL, 0.0f, s16, nb, C, xd, NULL, comb[r][0], nb, NULL);
    }
    for (int r = 0; r < R && !fast; r++)
        for (int c = 0; c < C; c++) {
            if (half)
                for (i64 i = 0; i < 2 * nb; i++) comb[r][c][i] = scale_at(s, s16, r * G + i) * xd[c * nb + i / 2];
            else
                block_multipliers((const char *)s + r * G * (s16 ? 2 : 4), s16, g / 32, nb, xd + c * nb, comb[r][c]);
        }
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[2][MAXC];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
    for (i64 b = 0; b < nb; b++) {
        __m256i wv[2], aw[2];
        for (int r = 0; r < R; r++) {
            wv[r] = _mm256_loadu_si256((const __m256i *)(w + r * K + 32 * b));
            PREFETCH(w + (r + 2) * K + 32 * b);
            aw[r] = _mm256_sign_epi8(wv[r], wv[r]);
        }
        for (int c = 0; c < C; c++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + c * K + 32 * b));
            for (int r = 0; r < R; r++) {
                __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw[r], _mm256_sign_epi8(xv, wv[r])), ones);
                __m256 m = half ? _mm256_set_m128(_mm_set1_ps(comb[r][c][2 * b + 1]), _mm_set1_ps(comb[r][c][2 * b]))
                                : _mm256_broadcast_ss(&comb[r][c][b]);
                acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), m, acc[r][c]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) out[c * ldo + r] = hsum(acc[r][c]);
}

/* q4: 4-bit weights with per-group scale s and offset m. Each pair of 32-input blocks is 32 bytes:
   byte t holds input t of the first block in its low nibble and input t of the second block in its
   high nibble. xg[c * G + gi] is the sum of token c's quantized inputs over group gi. */
INLINE void tile_q4(const uint8_t *w, const void *s, const void *m, int s16, i64 g, i64 K, int R,
                    const int8_t *xq, const float *xd, const float *xg, int C, float *out, i64 ldo) {
    i64 nb = K / 32, bpg = g / 32, G = K / g;
    i64 sb = G * (s16 ? 2 : 4);
    float comb[2][MAXC][nb], off[2][MAXC] = {{0.0f}};
    int fast = 0;
    __m256 acc[2][MAXC];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
    if (bpg == 1 && nb >= 8) {
        fast = 1;
        for (int r = 0; r < R; r++)
            multipliers_g32((const char *)s + r * sb, (const char *)(m ? m : s) + r * sb, m ? 1.0f : -8.0f, s16, nb, C,
                            xd, xg, comb[r][0], nb, acc[r]);
    }
    for (int r = 0; r < R && !fast; r++)
        for (int c = 0; c < C; c++) {
            block_multipliers((const char *)s + r * sb, s16, bpg, nb, xd + c * nb, comb[r][c]);
            off[r][c] = m ? scaled_sum((const char *)m + r * sb, s16, G, xg + c * G)
                          : -8.0f * scaled_sum((const char *)s + r * sb, s16, G, xg + c * G);
        }
    const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0f);
    for (i64 b = 0; b < nb; b += 2) {
        __m256i lo[2], hi[2];
        for (int r = 0; r < R; r++) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(w + r * K / 2 + 16 * b));
            PREFETCH(w + (r + 2) * K / 2 + 16 * b);
            lo[r] = _mm256_and_si256(raw, low);
            hi[r] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
        }
        for (int c = 0; c < C; c++) {
            __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + c * K + 32 * b));
            __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + c * K + 32 * b + 32));
            for (int r = 0; r < R; r++) {
                __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo[r], x0), ones);
                __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi[r], x1), ones);
                acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_broadcast_ss(&comb[r][c][b]), acc[r][c]);
                acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_broadcast_ss(&comb[r][c][b + 1]), acc[r][c]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) out[c * ldo + r] = hsum(acc[r][c]) + off[r][c];
}
