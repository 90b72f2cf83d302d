/* The AVX2 half of gemm.h: weights expanded 8 x 8 at a time (read along rows, transposed in
 * registers), and the micro-tile's sums in 12 vector registers. */
#pragma once

/* inputs [k, k + 8) of row n of W as fp32 (k a multiple of 8; `fmt` a constant where inlined) */
INLINE __m256 row8(const Linear *L, int fmt, i64 n, i64 k) {
    i64 i = n * L->K + k;
    switch (fmt) {
    case 0: return _mm256_loadu_ps((const float *)L->w + i);
    case 1: return LOAD_F16((const uint16_t *)L->w + i);
    default: return LOAD_BF16((const uint16_t *)L->w + i);
    }
}

/* r[j] = column j of the 8 x 8 matrix whose rows are r[0..7] */
INLINE void transpose8(__m256 *r) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);
        r[4 + i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
    }
}

INLINE void expand_fmt(const Linear *layer, int fmt, i64 n, int R, i64 k0, i64 kc, float *panel) {
    const Linear L = *layer; /* a local copy: the panel's stores cannot change it */
    for (int h = 0; h < PR; h += 8)
        for (i64 k = 0; k < kc; k += 8) {
            __m256 v[8];
            for (int r = 0; r < 8; r++) v[r] = h + r < R ? row8(&L, fmt, n + h + r, k0 + k) : _mm256_setzero_ps();
            transpose8(v);
            for (int j = 0; j < 8; j++) _mm256_store_ps(panel + (k + j) * PR + h, v[j]);
        }
}

/* rows [n, n + R) of W, inputs [k0, k0 + kc), as fp32 in panel[k * PR + r]; rows past R are zero */
static void expand(const Linear *L, i64 n, int R, i64 k0, i64 kc, float *panel) {
    switch (L->fmt) {
    case 0: expand_fmt(L, 0, n, R, k0, kc, panel); break;
    case 1: expand_fmt(L, 1, n, R, k0, kc, panel); break;
    default: expand_fmt(L, 2, n, R, k0, kc, panel);
    }
}

/* y[c * N + r] (+= when `add`) sum over k < kc of panel[k * PR + r] * xp[k * PT + c], for r < R and
   c < C (a compile-time constant where inlined) */
INLINE void micro(const float *panel, i64 kc, const float *xp, int C, int R, float *y, i64 N, int add) {
    float part[PT][PR];
    __m256 acc[PT][2];
    for (int c = 0; c < C; c++) acc[c][0] = acc[c][1] = _mm256_setzero_ps();
#pragma GCC unroll 4
    for (i64 k = 0; k < kc; k++) {
        __m256 a0 = _mm256_load_ps(panel + k * PR), a1 = _mm256_load_ps(panel + k * PR + 8);
        for (int c = 0; c < C; c++) {
            __m256 b = _mm256_broadcast_ss(xp + k * PT + c);
            acc[c][0] = _mm256_fmadd_ps(a0, b, acc[c][0]);
            acc[c][1] = _mm256_fmadd_ps(a1, b, acc[c][1]);
        }
    }
    for (int c = 0; c < C; c++) {
        float *out = y + c * N;
        if (R == PR) {
            _mm256_storeu_ps(out, add ? _mm256_add_ps(acc[c][0], _mm256_loadu_ps(out)) : acc[c][0]);
            _mm256_storeu_ps(out + 8, add ? _mm256_add_ps(acc[c][1], _mm256_loadu_ps(out + 8)) : acc[c][1]);
        } else {
            _mm256_storeu_ps(part[c], acc[c][0]);
            _mm256_storeu_ps(part[c] + 8, acc[c][1]);
        }
    }
    if (R == PR) return;
    for (int c = 0; c < C; c++) /* a last panel of fewer rows */
        for (int r = 0; r < R; r++) y[c * N + r] = add ? y[c * N + r] + part[c][r] : part[c][r];
}
