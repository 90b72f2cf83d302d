/* herd's CPU kernels for weight-only quantized and 16-bit linear layers.
 *
 * Decoding one token multiplies every weight matrix by one activation vector: the time is the time
 * to stream the weights from memory, so the kernels read each weight once per call, keep it
 * compressed in memory and expand it in registers. Matrices are row-major [N, K] (out x in), as in
 * torch.nn.Linear; x is [M, K] (M small: one row per token of a decode step), y is [M, N].
 *
 * Formats:
 *   f32, f16, bf16   plain weights; y = x W^T computed in fp32.
 *   q8               int8 weights, one scale per group of g inputs (g = 16, a multiple of 32, or
 *                    K for per-channel): w = q * s.
 *   q4               4-bit weights, one scale and one offset per group of g inputs (g a multiple of
 *                    32): w = q * s + m, q in 0..15. Each block of 32 inputs is 16 bytes: byte j
 *                    holds input j in its low nibble and input j + 16 in its high nibble (GGML's
 *                    Q4_0/Q4_1 order, so GGUF blocks repack with a strided copy).
 * Scales and offsets are fp16 or fp32 (`s16`), [N, K / g].
 *
 * For q8 and q4 the activations are quantized to int8 per block of 32 (as llama.cpp does), so the
 * inner loop is integer multiply-adds. Every (row, token) dot product is computed in the same order
 * whatever M is: a token's result does not depend on the other tokens of the call.
 *
 * Built at first use with the system C compiler (-O3 -march=native); AVX2 when the CPU has it,
 * portable C otherwise.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define HERD_AVX2 1
#endif

typedef int64_t i64;
#define INLINE static inline __attribute__((always_inline))
#define MAXC 4 /* tokens per tile */

INLINE float h2f(uint16_t h) {
#ifdef HERD_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) bits = sign | 0x7f800000 | (man << 13);
    else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (!man) bits = sign;
    else { /* subnormal */
        exp = 113;
        while (!(man & 0x400)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

INLINE float bf2f(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

INLINE float scale_at(const void *s, int s16, i64 i) {
    return s16 ? h2f(((const uint16_t *)s)[i]) : ((const float *)s)[i];
}

/* ---- activations: int8 per block of 32, with the block's scale and its sum (d * sum q) ---- */

static void quantize_x(const float *x, i64 M, i64 K, int8_t *xq, float *xd, float *xs) {
    i64 nb = K / 32;
    for (i64 i = 0; i < M * nb; i++) {
        const float *v = x + i * 32;
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(v[j]));
        float d = amax / 127.0f, id = d ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int j = 0; j < 32; j++) {
            int q = (int)nearbyintf(v[j] * id);
            xq[i * 32 + j] = (int8_t)q;
            sum += q;
        }
        xd[i] = d;
        xs[i] = d * (float)sum;
    }
}

#ifdef HERD_AVX2
INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* ---- one tile: R weight rows (ldw apart) against C tokens; out[c * ldo + r] ---- */

#ifdef HERD_AVX2
#define LOAD_F32(p) _mm256_loadu_ps(p)
#define LOAD_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define LOAD_BF16(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define FLOAT_TILE(NAME, T, LOAD)                                                                     \
    INLINE void NAME(const T *w, i64 K, int R, const float *x, int C, float *out, i64 ldo) {         \
        __m256 a[2][MAXC], b[2][MAXC];                                                                \
        for (int r = 0; r < R; r++)                                                                   \
            for (int c = 0; c < C; c++) a[r][c] = b[r][c] = _mm256_setzero_ps();                     \
        for (i64 k = 0; k < K; k += 16) {                                                             \
            for (int r = 0; r < R; r++) {                                                             \
                __m256 w0 = LOAD(w + r * K + k), w1 = LOAD(w + r * K + k + 8);                        \
                for (int c = 0; c < C; c++) {                                                         \
                    a[r][c] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + c * K + k), a[r][c]);           \
                    b[r][c] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + c * K + k + 8), b[r][c]);       \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
        for (int r = 0; r < R; r++)                                                                   \
            for (int c = 0; c < C; c++) out[c * ldo + r] = hsum(_mm256_add_ps(a[r][c], b[r][c]));    \
    }
#else
#define LOAD_F32(p) (*(p))
#define LOAD_F16(p) h2f(*(p))
#define LOAD_BF16(p) bf2f(*(p))
#define FLOAT_TILE(NAME, T, LOAD)                                                                     \
    INLINE void NAME(const T *w, i64 K, int R, const float *x, int C, float *out, i64 ldo) {         \
        for (int r = 0; r < R; r++)                                                                   \
            for (int c = 0; c < C; c++) {                                                             \
                float a = 0.0f;                                                                       \
                for (i64 k = 0; k < K; k++) a += LOAD(w + r * K + k) * x[c * K + k];                  \
                out[c * ldo + r] = a;                                                                 \
            }                                                                                         \
    }
#endif

FLOAT_TILE(tile_f32, float, LOAD_F32)
FLOAT_TILE(tile_f16, uint16_t, LOAD_F16)
FLOAT_TILE(tile_bf16, uint16_t, LOAD_BF16)

/* q8: int8 weights with per-group scales (s points at row 0's scales; G per row) */
INLINE void tile_q8(const int8_t *w, const void *s, int s16, i64 g, i64 K, int R, const int8_t *xq,
                    const float *xd, int C, float *out, i64 ldo) {
    i64 nb = K / 32, G = K / g, bpg = g == 16 ? 1 : g / 32;
#ifdef HERD_AVX2
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[2][MAXC];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
    for (i64 b = 0, gi = 0; b < nb; gi++) {
        __m256 sv[2];
        for (int r = 0; r < R; r++)
            sv[r] = g == 16 ? _mm256_set_m128(_mm_set1_ps(scale_at(s, s16, r * G + 2 * b + 1)),
                                              _mm_set1_ps(scale_at(s, s16, r * G + 2 * b)))
                            : _mm256_set1_ps(scale_at(s, s16, r * G + gi));
        for (i64 j = 0; j < bpg; j++, b++) {
            __m256i wv[2], aw[2];
            for (int r = 0; r < R; r++) {
                wv[r] = _mm256_loadu_si256((const __m256i *)(w + r * K + 32 * b));
                aw[r] = _mm256_sign_epi8(wv[r], wv[r]);
            }
            for (int c = 0; c < C; c++) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + c * K + 32 * b));
                __m256 d = _mm256_set1_ps(xd[c * nb + b]);
                for (int r = 0; r < R; r++) {
                    __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw[r], _mm256_sign_epi8(xv, wv[r])), ones);
                    acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(sv[r], d), acc[r][c]);
                }
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) out[c * ldo + r] = hsum(acc[r][c]);
#else
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            float a = 0.0f;
            for (i64 b = 0; b < nb; b++) {
                int lo = 0, hi = 0;
                for (int j = 0; j < 16; j++) lo += w[r * K + 32 * b + j] * xq[c * K + 32 * b + j];
                for (int j = 16; j < 32; j++) hi += w[r * K + 32 * b + j] * xq[c * K + 32 * b + j];
                float slo = scale_at(s, s16, r * G + (g == 16 ? 2 * b : b / bpg));
                float shi = g == 16 ? scale_at(s, s16, r * G + 2 * b + 1) : slo;
                a += ((float)lo * slo + (float)hi * shi) * xd[c * nb + b];
            }
            out[c * ldo + r] = a;
        }
#endif
}

/* 8 scales starting at index i, as floats */
#ifdef HERD_AVX2
INLINE __m256 scales8(const void *s, int s16, i64 i) {
    return s16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)s + i)))
               : _mm256_loadu_ps((const float *)s + i);
}
#endif

/* comb[b] = s[b / bpg] * xd[b] for the nb blocks of one row and one token */
INLINE void block_multipliers(const void *s, int s16, i64 bpg, i64 nb, const float *xd, float *comb) {
    i64 b = 0;
#ifdef HERD_AVX2
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
#endif
    for (i64 gi = b / bpg; b < nb; gi++) {
        float sg = scale_at(s, s16, gi);
        for (i64 j = 0; j < bpg; j++, b++) comb[b] = sg * xd[b];
    }
}

/* sum over i < n of s[i] * v[i] */
INLINE float scaled_sum(const void *s, int s16, i64 n, const float *v) {
    i64 i = 0;
    float total = 0.0f;
#ifdef HERD_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(scales8(s, s16, i), _mm256_loadu_ps(v + i), acc);
    total = hsum(acc);
#endif
    for (; i < n; i++) total += scale_at(s, s16, i) * v[i];
    return total;
}

/* q4: 4-bit weights with per-group scale s and offset m. Each pair of 32-input blocks is 32 bytes:
   byte t holds input t of the first block in its low nibble and input t of the second block in its
   high nibble. xg[c * G + gi] is the sum of token c's quantized inputs over group gi. */
#define Q4C 2
INLINE void tile_q4(const uint8_t *w, const void *s, const void *m, int s16, i64 g, i64 K, int R,
                    const int8_t *xq, const float *xd, const float *xg, int C, float *out, i64 ldo) {
    i64 nb = K / 32, bpg = g / 32, G = K / g;
    i64 sb = G * (s16 ? 2 : 4);
    float comb[2][Q4C][nb], off[2][Q4C];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            block_multipliers((const char *)s + r * sb, s16, bpg, nb, xd + c * nb, comb[r][c]);
            off[r][c] = scaled_sum((const char *)m + r * sb, s16, G, xg + c * G);
        }
#ifdef HERD_AVX2
    const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0f);
    __m256 a0[2][Q4C], a1[2][Q4C];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) a0[r][c] = a1[r][c] = _mm256_setzero_ps();
    for (i64 b = 0; b < nb; b += 2) {
        __m256i lo[2], hi[2];
        for (int r = 0; r < R; r++) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(w + r * K / 2 + 16 * b));
            lo[r] = _mm256_and_si256(raw, low);
            hi[r] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
        }
        for (int c = 0; c < C; c++) {
            __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + c * K + 32 * b));
            __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + c * K + 32 * b + 32));
            for (int r = 0; r < R; r++) {
                __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo[r], x0), ones);
                __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi[r], x1), ones);
                a0[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_broadcast_ss(&comb[r][c][b]), a0[r][c]);
                a1[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_broadcast_ss(&comb[r][c][b + 1]), a1[r][c]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) out[c * ldo + r] = hsum(_mm256_add_ps(a0[r][c], a1[r][c])) + off[r][c];
#else
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
#endif
}

/* ---- entry points: y[M, N] = x[M, K] W^T ---- */

/* Run TILE(R, C, n, m0) over all rows (in pairs) and tokens (in groups of MAXC), rows split
   between threads. R and C are compile-time constants in every expansion. */
#define FOR_TILES(N, M, threads, TILE, MAXT)                                                                \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                                 \
    for (i64 n = 0; n < (N + 1) / 2 * 2; n += 2) {                                                    \
        for (i64 m0 = 0; m0 < M; m0 += MAXT) {                                                        \
            int C = M - m0 < MAXT ? (int)(M - m0) : MAXT;                                             \
            if (n + 1 < N) {                                                                          \
                switch (C) {                                                                          \
                case 1: TILE(2, 1, n, m0); break;                                                     \
                case 2: TILE(2, 2, n, m0); break;                                                     \
                case 3: TILE(2, 3, n, m0); break;                                                     \
                case 4: TILE(2, 4, n, m0);                                                           \
                }                                                                                     \
            } else {                                                                                  \
                switch (C) {                                                                          \
                case 1: TILE(1, 1, n, m0); break;                                                     \
                case 2: TILE(1, 2, n, m0); break;                                                     \
                case 3: TILE(1, 3, n, m0); break;                                                     \
                case 4: TILE(1, 4, n, m0);                                                           \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
    }

#define F32_TILE(R, C, n, m0) tile_f32(w + n * K, K, R, x + m0 * K, C, y + m0 * N + n, N)
#define F16_TILE(R, C, n, m0) tile_f16(w + n * K, K, R, x + m0 * K, C, y + m0 * N + n, N)
#define BF16_TILE(R, C, n, m0) tile_bf16(w + n * K, K, R, x + m0 * K, C, y + m0 * N + n, N)

void herd_mv_f32(const float *x, i64 M, i64 K, const float *w, i64 N, float *y, int threads) {
    FOR_TILES(N, M, threads, F32_TILE, MAXC)
}

void herd_mv_f16(const float *x, i64 M, i64 K, const uint16_t *w, i64 N, float *y, int threads) {
    FOR_TILES(N, M, threads, F16_TILE, MAXC)
}

void herd_mv_bf16(const float *x, i64 M, i64 K, const uint16_t *w, i64 N, float *y, int threads) {
    FOR_TILES(N, M, threads, BF16_TILE, MAXC)
}

#define SCALES(p, n) ((const char *)(p) + (n) * (K / g) * (s16 ? 2 : 4))
#define Q8_TILE(R, C, n, m0) \
    tile_q8(w + n * K, SCALES(s, n), s16, g, K, R, xq + m0 * K, xd + m0 * nb, C, y + m0 * N + n, N)
#define Q4_TILE(R, C, n, m0) \
    tile_q4(w + n * K / 2, SCALES(s, n), SCALES(m, n), s16, g, K, (R), xq + m0 * K, xd + m0 * nb, xg + m0 * (K / g), \
            (C) < Q4C ? (C) : Q4C, y + m0 * N + n, N)

void herd_mv_q8(const float *x, i64 M, i64 K, const int8_t *w, const void *s, int s16, i64 g, i64 N, float *y,
                int threads) {
    i64 nb = K / 32;
    int8_t *xq = malloc(M * K);
    float *xd = malloc(M * nb * sizeof(float)), *xs = malloc(M * nb * sizeof(float));
    quantize_x(x, M, K, xq, xd, xs);
    FOR_TILES(N, M, threads, Q8_TILE, MAXC)
    free(xq);
    free(xd);
    free(xs);
}

void herd_mv_q4(const float *x, i64 M, i64 K, const uint8_t *w, const void *s, const void *m, int s16, i64 g,
                i64 N, float *y, int threads) {
    i64 nb = K / 32, G = K / g;
    int8_t *xq = malloc(M * K);
    float *xd = malloc(M * nb * sizeof(float)), *xs = malloc(M * nb * sizeof(float)), *xg = calloc(M * G, sizeof(float));
    quantize_x(x, M, K, xq, xd, xs);
    for (i64 i = 0; i < M * nb; i++) xg[i / (g / 32)] += xs[i];
    FOR_TILES(N, M, threads, Q4_TILE, Q4C)
    free(xq);
    free(xd);
    free(xs);
    free(xg);
}

/* ---- dequantization of rows [n0, n1) to fp32 (prefill: then one sgemm per tile) ---- */

void herd_dequant_f16(const uint16_t *w, i64 K, i64 n0, i64 n1, float *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (i64 n = n0; n < n1; n++)
        for (i64 k = 0; k < K; k++) out[(n - n0) * K + k] = h2f(w[n * K + k]);
}

void herd_dequant_bf16(const uint16_t *w, i64 K, i64 n0, i64 n1, float *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (i64 n = n0; n < n1; n++)
        for (i64 k = 0; k < K; k++) out[(n - n0) * K + k] = bf2f(w[n * K + k]);
}

void herd_dequant_q8(const int8_t *w, const void *s, int s16, i64 g, i64 K, i64 n0, i64 n1, float *out,
                     int threads) {
    i64 G = K / g;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (i64 n = n0; n < n1; n++)
        for (i64 gi = 0; gi < G; gi++) {
            float sg = scale_at(s, s16, n * G + gi);
            for (i64 k = gi * g; k < (gi + 1) * g; k++) out[(n - n0) * K + k] = (float)w[n * K + k] * sg;
        }
}

void herd_dequant_q4(const uint8_t *w, const void *s, const void *m, int s16, i64 g, i64 K, i64 n0, i64 n1,
                     float *out, int threads) {
    i64 G = K / g;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (i64 n = n0; n < n1; n++)
        for (i64 b = 0; b < K / 32; b += 2) {
            const uint8_t *q = w + n * K / 2 + 16 * b;
            float *o = out + (n - n0) * K + 32 * b;
            float s0 = scale_at(s, s16, n * G + 32 * b / g), m0 = scale_at(m, s16, n * G + 32 * b / g);
            float s1 = scale_at(s, s16, n * G + 32 * (b + 1) / g), m1 = scale_at(m, s16, n * G + 32 * (b + 1) / g);
            for (int t = 0; t < 32; t++) {
                o[t] = (float)(q[t] & 15) * s0 + m0;
                o[t + 32] = (float)(q[t] >> 4) * s1 + m1;
            }
        }
}

/* ---- the whole forward pass for a few tokens with a KV cache (decode steps) ----
 *
 * The same computation as herd.model.Transformer.forward with a cache, for B rows of T tokens,
 * each token at its own position: one call per step instead of dozens of torch operations per
 * layer. Embeddings (any format) and rotary angles come in from torch; logits go out.
 */

typedef struct {
    int fmt; /* 0 f32, 1 f16, 2 bf16, 3 q8, 4 q4 */
    int s16;
    i64 g, N, K;
    const void *w, *s, *m;
} Linear;

typedef struct {
    const float *attn_norm, *ffn_norm;
    Linear wq, wk, wv, wo, w1, w2, w3;
} Layer;

typedef struct {
    i64 dim, hidden, n_layers, n_heads, n_kv_heads, head_dim;
    float eps;
    const Layer *layers;
    const float *norm;
    Linear output;
} Model;

typedef struct {
    const Model *model;
    i64 B, T;
    float *x;                 /* [B * T, dim]: the embeddings; overwritten */
    const i64 *pos;           /* [B * T] */
    const float *cos, *sin;   /* [B * T, head_dim / 2] */
    const i64 *rows;          /* [B]: the cache row of each batch row */
    float *k_cache, *v_cache; /* [n_layers, cache_rows, n_kv_heads, cache_len, head_dim] */
    i64 cache_rows, cache_len;
    const i64 *logits_at;     /* [B] index in T of the one token per row whose logits are wanted, or NULL */
    float *logits;            /* [B, T or 1, vocab] */
    int threads;
} Step;

static void linear(const Linear *L, const float *x, i64 M, float *y, int threads) {
    switch (L->fmt) {
    case 0: herd_mv_f32(x, M, L->K, L->w, L->N, y, threads); break;
    case 1: herd_mv_f16(x, M, L->K, L->w, L->N, y, threads); break;
    case 2: herd_mv_bf16(x, M, L->K, L->w, L->N, y, threads); break;
    case 3: herd_mv_q8(x, M, L->K, L->w, L->s, L->s16, L->g, L->N, y, threads); break;
    default: herd_mv_q4(x, M, L->K, L->w, L->s, L->m, L->s16, L->g, L->N, y, threads);
    }
}

INLINE float dot(const float *a, const float *b, i64 n) {
    i64 i = 0;
    float total = 0.0f;
#ifdef HERD_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    total = hsum(acc);
#endif
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

static void rmsnorm(const float *x, const float *w, i64 M, i64 dim, float eps, float *out) {
    for (i64 i = 0; i < M; i++) {
        const float *v = x + i * dim;
        float r = 1.0f / sqrtf(dot(v, v, dim) / (float)dim + eps);
        for (i64 j = 0; j < dim; j++) out[i * dim + j] = v[j] * r * w[j];
    }
}

/* rotate interleaved pairs of each head of x [M, heads, D] by the token's angles */
static void rope(float *x, i64 M, i64 heads, i64 D, const float *cos, const float *sin) {
    for (i64 i = 0; i < M; i++)
        for (i64 h = 0; h < heads; h++) {
            float *v = x + (i * heads + h) * D;
            const float *c = cos + i * D / 2, *s = sin + i * D / 2;
            for (i64 j = 0; j < D / 2; j++) {
                float a = v[2 * j], b = v[2 * j + 1];
                v[2 * j] = a * c[j] - b * s[j];
                v[2 * j + 1] = a * s[j] + b * c[j];
            }
        }
}

void herd_forward(const Step *st) {
    const Model *md = st->model;
    i64 M = st->B * st->T, dim = md->dim, H = md->n_heads, KVH = md->n_kv_heads, D = md->head_dim;
    i64 S = st->cache_len, CR = st->cache_rows;
    int threads = st->threads;
    float *x = st->x;
    float *xn = malloc(M * dim * sizeof(float)), *q = malloc(M * H * D * sizeof(float));
    float *k = malloc(M * KVH * D * sizeof(float)), *v = malloc(M * KVH * D * sizeof(float));
    float *att = malloc(M * H * D * sizeof(float)), *o = malloc(M * dim * sizeof(float));
    float *h1 = malloc(M * md->hidden * sizeof(float)), *h3 = malloc(M * md->hidden * sizeof(float));
    float *scores = malloc((size_t)threads * S * sizeof(float));
    float scale = 1.0f / sqrtf((float)D);

    for (i64 l = 0; l < md->n_layers; l++) {
        const Layer *L = md->layers + l;
        rmsnorm(x, L->attn_norm, M, dim, md->eps, xn);
        linear(&L->wq, xn, M, q, threads);
        linear(&L->wk, xn, M, k, threads);
        linear(&L->wv, xn, M, v, threads);
        rope(q, M, H, D, st->cos, st->sin);
        rope(k, M, KVH, D, st->cos, st->sin);
        float *kc = st->k_cache + l * CR * KVH * S * D, *vc = st->v_cache + l * CR * KVH * S * D;
        for (i64 i = 0; i < M; i++) {
            i64 row = st->rows[i / st->T], p = st->pos[i];
            for (i64 h = 0; h < KVH; h++) {
                memcpy(kc + ((row * KVH + h) * S + p) * D, k + (i * KVH + h) * D, D * sizeof(float));
                memcpy(vc + ((row * KVH + h) * S + p) * D, v + (i * KVH + h) * D, D * sizeof(float));
            }
        }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
        for (i64 ih = 0; ih < M * H; ih++) {
            i64 i = ih / H, h = ih % H, kvh = h / (H / KVH), p = st->pos[i];
            const float *qv = q + ih * D;
            const float *ks = kc + (st->rows[i / st->T] * KVH + kvh) * S * D;
            const float *vs = vc + (st->rows[i / st->T] * KVH + kvh) * S * D;
#ifdef _OPENMP
            float *sc = scores + (i64)omp_get_thread_num() * S;
#else
            float *sc = scores;
#endif
            float mx = -INFINITY, sum = 0.0f;
            for (i64 j = 0; j <= p; j++) {
                sc[j] = dot(qv, ks + j * D, D) * scale;
                mx = fmaxf(mx, sc[j]);
            }
            for (i64 j = 0; j <= p; j++) {
                sc[j] = expf(sc[j] - mx);
                sum += sc[j];
            }
            float *out = att + ih * D;
            for (i64 d = 0; d < D; d++) out[d] = 0.0f;
            for (i64 j = 0; j <= p; j++) {
                float pj = sc[j] / sum;
                const float *vj = vs + j * D;
                for (i64 d = 0; d < D; d++) out[d] += pj * vj[d];
            }
        }
        linear(&L->wo, att, M, o, threads);
        for (i64 j = 0; j < M * dim; j++) x[j] += o[j];
        rmsnorm(x, L->ffn_norm, M, dim, md->eps, xn);
        linear(&L->w1, xn, M, h1, threads);
        linear(&L->w3, xn, M, h3, threads);
        for (i64 j = 0; j < M * md->hidden; j++) h1[j] = h1[j] / (1.0f + expf(-h1[j])) * h3[j];
        linear(&L->w2, h1, M, o, threads);
        for (i64 j = 0; j < M * dim; j++) x[j] += o[j];
    }
    i64 n_out = M;
    if (st->logits_at) { /* keep one token per row */
        n_out = st->B;
        for (i64 b = 0; b < st->B; b++) memmove(x + b * dim, x + (b * st->T + st->logits_at[b]) * dim, dim * sizeof(float));
    }
    rmsnorm(x, md->norm, n_out, dim, md->eps, xn);
    linear(&md->output, xn, n_out, st->logits, threads);
    free(xn); free(q); free(k); free(v); free(att); free(o); free(h1); free(h3); free(scores);
}
