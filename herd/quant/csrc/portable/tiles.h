/* The plain C half of tiles.h. */
#pragma once

/* sum over i < n of s[i] * v[i] */
INLINE float scaled_sum(const void *s, int s16, i64 n, const float *v) {
    float total = 0.0f;
    for (i64 i = 0; i < n; i++) total += scale_at(s, s16, i) * v[i];
    return total;
}

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

/* q8: int8 weights with per-group scales (s points at row 0's scales; K / g per row; `half`: g = 16,
   two scales per block of 32): each block's integer dot product times the weights' scale times the
   activations' (as avx2/tiles.h, which multiplies the two scales up front) */
INLINE void tile_q8(const int8_t *w, const void *s, int s16, i64 g, i64 K, int R, const int8_t *xq,
                    const float *xd, int C, float *out, i64 ldo, int half) {
    i64 nb = K / 32, G = K / g;
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            float a = 0.0f;
            for (i64 b = 0; b < nb; b++) {
                int lo = 0, hi = 0;
                for (int j = 0; j < 16; j++) lo += w[r * K + 32 * b + j] * xq[c * K + 32 * b + j];
                for (int j = 16; j < 32; j++) hi += w[r * K + 32 * b + j] * xq[c * K + 32 * b + j];
                float d = xd[c * nb + b];
                if (half)
                    a += (float)lo * (scale_at(s, s16, r * G + 2 * b) * d) + (float)hi * (scale_at(s, s16, r * G + 2 * b + 1) * d);
                else
                    a += (float)(lo + hi) * (scale_at(s, s16, r * G + b * 32 / g) * d);
            }
            out[c * ldo + r] = a;
        }
}

/* q4: 4-bit weights with per-group scale s and offset m (NULL: symmetric, -8 s), in the byte order of
   avx2/tiles.h; xg[c * G + gi] is the sum of token c's quantized inputs over group gi */
INLINE void tile_q4(const uint8_t *w, const void *s, const void *m, int s16, i64 g, i64 K, int R,
                    const int8_t *xq, const float *xd, const float *xg, int C, float *out, i64 ldo) {
    i64 nb = K / 32, G = K / g;
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
                a += (float)d0 * (scale_at(s, s16, r * G + b * 32 / g) * xd[c * nb + b])
                     + (float)d1 * (scale_at(s, s16, r * G + (b + 1) * 32 / g) * xd[c * nb + b + 1]);
            }
            i64 at = r * G * (s16 ? 2 : 4); /* where this row's scales and offsets start, in bytes */
            float off = m ? scaled_sum((const char *)m + at, s16, G, xg + c * G)
                          : -8.0f * scaled_sum((const char *)s + at, s16, G, xg + c * G);
            out[c * ldo + r] = a + off;
        }
}
