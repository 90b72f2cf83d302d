/* The plain C half of gemm.h: the weights expanded one at a time. */
#pragma once

/* element k of row n of W as fp32 */
static float weight_at(const Linear *L, i64 n, i64 k) {
    i64 i = n * L->K + k;
    switch (L->fmt) {
    case 0: return ((const float *)L->w)[i];
    case 1: return h2f(((const uint16_t *)L->w)[i]);
    default: return bf2f(((const uint16_t *)L->w)[i]);
    }
}

/* rows [n, n + R) of W, inputs [k0, k0 + kc), as fp32 in panel[k * PR + r]; rows past R are zero */
static void expand(const Linear *L, i64 n, int R, i64 k0, i64 kc, float *panel) {
    for (i64 k = 0; k < kc; k++)
        for (int r = 0; r < PR; r++) panel[k * PR + r] = r < R ? weight_at(L, n + r, k0 + k) : 0.0f;
}

/* y[c * N + r] (+= when `add`) sum over k < kc of panel[k * PR + r] * xp[k * PT + c], for r < R and
   c < C */
INLINE void micro(const float *panel, i64 kc, const float *xp, int C, int R, float *y, i64 N, int add) {
    float part[PT][PR];
    for (int c = 0; c < C; c++)
        for (int r = 0; r < R; r++) {
            part[c][r] = 0.0f;
            for (i64 k = 0; k < kc; k++) part[c][r] += panel[k * PR + r] * xp[k * PT + c];
        }
    for (int c = 0; c < C; c++)
        for (int r = 0; r < R; r++) y[c * N + r] = add ? y[c * N + r] + part[c][r] : part[c][r];
}
