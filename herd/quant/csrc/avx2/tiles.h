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
   time: comb[c * ldc + b] = s[b] * xd[c * nb + b]. A last partial octet is read at nb - 8: its
   multipliers are written again, unchanged. */
INLINE void multipliers_g32(const void *s, int s16, i64 nb, int C, const float *xd, float *comb, i64 ldc) {
    for (i64 b = 0; b < nb; b += 8) {
        i64 at = b + 8 <= nb ? b : nb - 8;
        __m256 sv = scales8(s, s16, at);
        for (int c = 0; c < C; c++) _mm256_storeu_ps(comb + c * ldc + at, _mm256_mul_ps(sv, _mm256_loadu_ps(xd + c * nb + at)));
    }
}

/* comb[r][c][b] = the weights' scale times the activations' for block b of row r and token c (rows
   of G scales at s; g = 32 and at least 8 blocks take multipliers_g32) */
INLINE void multipliers(const void *s, int s16, i64 g, i64 K, int R, int C, const float *xd, float *comb) {
    i64 nb = K / 32, sb = K / g * (s16 ? 2 : 4);
    for (int r = 0; r < R; r++) {
        if (g == 32 && nb >= 8)
            multipliers_g32((const char *)s + r * sb, s16, nb, C, xd, comb + r * MAXC * nb, nb);
        else
            for (int c = 0; c < C; c++)
                block_multipliers((const char *)s + r * sb, s16, g / 32, nb, xd + c * nb, comb + (r * MAXC + c) * nb);
    }
}

/* out[c * ldo + r] = hsum(acc[r][c]) + off[r][c] */
INLINE void lanes_out(__m256 acc[2][MAXC], float off[2][MAXC], int R, int C, float *out, i64 ldo) {
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) out[c * ldo + r] = hsum(acc[r][c]) + off[r][c];
}

/* q8: int8 weights with per-group scales (s points at row 0's scales; G per row). Each block's 8
   lanes of integer sums (4 inputs each) are accumulated, times the product of the two scales, in 8
   float lanes: llama.cpp's ggml_vec_dot_q8_0_q8_0 on x86. `half`: g = 16, so each block of 32 has
   two scales (lanes 0-3 cover its first 16 inputs, lanes 4-7 the other 16). */
INLINE void tile_q8(const int8_t *w, const void *s, int s16, i64 g, i64 K, int R, const int8_t *xq,
                    const float *xd, int C, float *out, i64 ldo, int half) {
    i64 nb = K / 32, G = K / g;
    float comb[2][MAXC][half ? 2 * nb : nb], off[2][MAXC] = {{0.0f}};
    if (half)
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++)
                for (i64 i = 0; i < 2 * nb; i++) comb[r][c][i] = scale_at(s, s16, r * G + i) * xd[c * nb + i / 2];
    else
        multipliers(s, s16, g, K, R, C, xd, &comb[0][0][0]);
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
                __m256i p = dot_us(_mm256_setzero_si256(), aw[r], _mm256_sign_epi8(xv, wv[r]));
                __m256 m = half ? _mm256_set_m128(_mm_set1_ps(comb[r][c][2 * b + 1]), _mm_set1_ps(comb[r][c][2 * b]))
                                : _mm256_broadcast_ss(&comb[r][c][b]);
                acc[r][c] = _mm256_fmadd_ps(m, _mm256_cvtepi32_ps(p), acc[r][c]);
            }
        }
    }
    lanes_out(acc, off, R, C, out, ldo);
}

/* q4: 4-bit weights with per-group scale s and offset m (NULL: symmetric, w = (q - 8) s). Each pair
   of 32-input blocks is 32 bytes: byte t holds input t of the first block in its low nibble and
   input t of the second block in its high nibble. Lanes as tile_q8's: of (q - 8) x when symmetric
   (the integer sums of q x less 8 x; llama.cpp's ggml_vec_dot_q4_0_q8_0), of q x plus the offsets'
   sum otherwise (offsets(); ggml_vec_dot_q4_1_q8_1). */
INLINE void tile_q4(const uint8_t *w, const void *s, const void *m, int s16, i64 g, i64 K, int R,
                    const int8_t *xq, const float *xd, const float *xg, int C, float *out, i64 ldo) {
    i64 nb = K / 32, G = K / g;
    float comb[2][MAXC][nb], off[2][MAXC] = {{0.0f}};
    multipliers(s, s16, g, K, R, C, xd, &comb[0][0][0]);
    if (m) offsets(m, s16, G, G * (s16 ? 2 : 4), R, xg, C, off);
    __m256 acc[2][MAXC];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0f), eight = _mm256_set1_epi8(8), zero = _mm256_setzero_si256();
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
            /* symmetric: start the sums at -8 x, so that they end at (q - 8) x */
            __m256i n0 = m ? zero : _mm256_sub_epi32(zero, dot_us(zero, eight, x0));
            __m256i n1 = m ? zero : _mm256_sub_epi32(zero, dot_us(zero, eight, x1));
            for (int r = 0; r < R; r++) {
                __m256 p0 = _mm256_cvtepi32_ps(dot_us(n0, lo[r], x0)), p1 = _mm256_cvtepi32_ps(dot_us(n1, hi[r], x1));
                acc[r][c] = _mm256_fmadd_ps(_mm256_broadcast_ss(&comb[r][c][b]), p0, acc[r][c]);
                acc[r][c] = _mm256_fmadd_ps(_mm256_broadcast_ss(&comb[r][c][b + 1]), p1, acc[r][c]);
            }
        }
    }
    lanes_out(acc, off, R, C, out, ldo);
}
