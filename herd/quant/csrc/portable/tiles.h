/* The plain C half of tiles.h. */
#pragma once

/* NAME(w, K, R, x, C, out, ldo): R rows of T weights (read with LOAD) against C fp32 tokens (PF, the
   prefetch of avx2/tiles.h, unused) */
#define FLOAT_TILE(NAME, T, LOAD, PF)                                                                 \
    INLINE void NAME(const T *w, i64 K, int R, const float *x, int C, float *out, i64 ldo) {         \
        for (int r = 0; r < R; r++)                                                                   \
            for (int c = 0; c < C; c++) {                                                             \
                float a = 0.0f;                                                                       \
                for (i64 k = 0; k < K; k++) a += LOAD(w + r * K + k) * x[c * K + k];                  \
                out[c * ldo + r] = a;                                                                 \
            }                                                                                         \
    }

/* q8: int8 weights with per-group scales (see q8_multipliers) */
INLINE void tile_q8(const int8_t *w, const void *s, int s16, i64 g, i64 K, int R, const int8_t *xq,
                    const float *xd, int C, float *out, i64 ldo, int half) {
    i64 nb = K / 32, per = half ? 2 : 1;
    float comb[2][MAXC][per * nb];
    q8_multipliers(s, s16, g, K, R, xd, C, half, per * nb, comb);
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            float a = 0.0f;
            for (i64 b = 0; b < nb; b++) {
                int lo = 0, hi = 0;
                for (int j = 0; j < 16; j++) lo += w[r * K + 32 * b + j] * xq[c * K + 32 * b + j];
                for (int j = 16; j < 32; j++) hi += w[r * K + 32 * b + j] * xq[c * K + 32 * b + j];
                a += half ? (float)lo * comb[r][c][2 * b] + (float)hi * comb[r][c][2 * b + 1]
                          : (float)(lo + hi) * comb[r][c][b];
            }
            out[c * ldo + r] = a;
        }
}

/* q4: 4-bit weights with per-group scale s and offset m (see q4_multipliers), in the byte order of
   avx2/tiles.h */
INLINE void tile_q4(const uint8_t *w, const void *s, const void *m, int s16, i64 g, i64 K, int R,
                    const int8_t *xq, const float *xd, const float *xg, int C, float *out, i64 ldo) {
    i64 nb = K / 32;
    float comb[2][MAXC][nb], off[2][MAXC];
    q4_multipliers(s, m, s16, g, K, R, xd, xg, C, nb, comb, off);
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            float a = 0.0f;
            for (i64 b = 0; b < nb; b += 2) {
                int d0 = 0, d1 = 0;
                for (int t = 0; t < 32; t++) {
                    uint8_t q = w[r * K / 2 + 16 * b + t];
                    d0 += (q & 15) * xq[c * K + 32 * b + t];
                    d1 += (q >> 4) * xq[c * K + 32 * b + 32 + t];
                }
                a += (float)d0 * comb[r][c][b] + (float)d1 * comb[r][c][b + 1];
            }
            out[c * ldo + r] = a + off[r][c];
        }
}
