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

/* out[c * ldo + r] = the 8 lanes of acc[r][c], summed as hsum8 does, plus off[r][c] */
INLINE void lanes_out(float acc[2][MAXC][8], float off[2][MAXC], int R, int C, float *out, i64 ldo) {
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) out[c * ldo + r] = hsum8(acc[r][c]) + off[r][c];
}

/* q8: int8 weights with per-group scales (s points at row 0's scales; K / g per row; `half`: g = 16,
   two scales per block of 32). Lane j of a block's integer dot product sums inputs 4j..4j+3; each
   lane accumulates, block after block, its integer sum times the weights' scale times the
   activations' (one fused multiply-add): llama.cpp's ggml_vec_dot_q8_0_q8_0 on x86. */
INLINE void tile_q8(const int8_t *w, const void *s, int s16, i64 g, i64 K, int R, const int8_t *xq,
                    const float *xd, int C, float *out, i64 ldo, int half) {
    i64 nb = K / 32, G = K / g;
    float acc[2][MAXC][8] = {{{0.0f}}}, off[2][MAXC] = {{0.0f}};
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            for (i64 b = 0; b < nb; b++)
                for (int j = 0; j < 8; j++) {
                    const int8_t *wj = w + r * K + 32 * b + 4 * j, *xj = xq + c * K + 32 * b + 4 * j;
                    int lane = wj[0] * xj[0] + wj[1] * xj[1] + wj[2] * xj[2] + wj[3] * xj[3];
                    float sw = scale_at(s, s16, r * G + (half ? 2 * b + j / 4 : b * 32 / g));
                    acc[r][c][j] = fmaf(sw * xd[c * nb + b], (float)lane, acc[r][c][j]);
                }
    lanes_out(acc, off, R, C, out, ldo);
}

/* q4: 4-bit weights with per-group scale s and offset m (NULL: symmetric, w = (q - 8) s), in the
   byte order of avx2/tiles.h. Lanes as tile_q8's, of (q - 8) x when symmetric (llama.cpp's
   ggml_vec_dot_q4_0_q8_0), of q x plus the offsets' sum (offsets()) otherwise (ggml_vec_dot_q4_1_q8_1). */
INLINE void tile_q4(const uint8_t *w, const void *s, const void *m, int s16, i64 g, i64 K, int R,
                    const int8_t *xq, const float *xd, const float *xg, int C, float *out, i64 ldo) {
    i64 nb = K / 32, G = K / g, sb = G * (s16 ? 2 : 4); /* sb: bytes of scales per row */
    float acc[2][MAXC][8] = {{{0.0f}}}, off[2][MAXC] = {{0.0f}};
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            for (i64 b = 0; b < nb; b++)
                for (int j = 0; j < 8; j++) {
                    int lane = 0;
                    for (int t = 4 * j; t < 4 * j + 4; t++) {
                        uint8_t byte = w[r * K / 2 + 16 * (b & ~(i64)1) + t];
                        lane += ((b & 1 ? byte >> 4 : byte & 15) - (m ? 0 : 8)) * xq[c * K + 32 * b + t];
                    }
                    float sw = scale_at(s, s16, r * G + b * 32 / g);
                    acc[r][c][j] = fmaf(sw * xd[c * nb + b], (float)lane, acc[r][c][j]);
                }
        }
    if (m) offsets(m, s16, G, sb, R, xg, C, off);
    lanes_out(acc, off, R, C, out, ldo);
}
