/* herd's CPU kernels for weight-only quantized and 16-bit linear layers.
 *
 * Decoding one token multiplies every weight matrix by one activation vector: the time is the time
 * to stream the weights from memory, so the decode kernels (herd_linear, herd_forward) read each
 * weight once per call, keep it compressed in memory and expand it in registers. Prefill (dozens of
 * tokens) is arithmetic-bound instead: herd_matmul is a blocked matrix multiply on weights expanded
 * to fp32 (its own section below). Matrices are row-major [N, K] (out x in), as in torch.nn.Linear;
 * x is [M, K] (one row per token), y is [M, N].
 *
 * Formats:
 *   f32, f16, bf16   plain weights; y = x W^T computed in fp32.
 *   q8               int8 weights, one scale per group of g inputs (g = 16, a multiple of 32, or
 *                    K for per-channel): w = q * s.
 *   q4               4-bit weights, one scale and one offset per group of g inputs (g a multiple of
 *                    32): w = q * s + m, q in 0..15; or symmetric, no offsets (m NULL, 10% fewer
 *                    bytes to stream): w = (q - 8) * s. Each block of 32 inputs is 16 bytes: byte j
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
#include <sched.h>
#include <stdatomic.h>
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
/* Weights are read as one pass over memory, and the hardware prefetcher alone falls behind: while a
   tile reads its two rows, prefetch the same place in the next tile's two rows (two rows on; past
   the end of the matrix a prefetch is harmless). Measured on 2 Zen 3 cores: int8 decode streaming
   9 -> 17 GB/s, TinyLlama int4 decode +10-15% over a fixed distance of 1.5 KB. */
#define PREFETCH(p) __builtin_prefetch(p)

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
        float d;
        int sum = 0;
#ifdef HERD_AVX2
        /* the same numbers as the loops below (round half to even, like nearbyintf), 8 at a time */
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 a[4];
        for (int j = 0; j < 4; j++) a[j] = _mm256_loadu_ps(v + 8 * j);
        __m256 big = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, a[0]), _mm256_andnot_ps(sign, a[1])),
                                   _mm256_max_ps(_mm256_andnot_ps(sign, a[2]), _mm256_andnot_ps(sign, a[3])));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(big), _mm256_extractf128_ps(big, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        d = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4))) / 127.0f;
        __m256 id = _mm256_set1_ps(d ? 1.0f / d : 0.0f);
        __m256i q[4];
        for (int j = 0; j < 4; j++)
            q[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(a[j], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
        s4 = _mm_hadd_epi32(s4, s4);
        sum = _mm_cvtsi128_si32(_mm_hadd_epi32(s4, s4));
        /* packing interleaves the four vectors 4 values at a time; the permute restores the order */
        __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(xq + i * 32), bytes);
#else
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(v[j]));
        d = amax / 127.0f;
        float id = d ? 1.0f / d : 0.0f;
        for (int j = 0; j < 32; j++) {
            int q = (int)nearbyintf(v[j] * id);
            xq[i * 32 + j] = (int8_t)q;
            sum += q;
        }
#endif
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
#else
#define LOAD_F32(p) (*(p))
#define LOAD_F16(p) h2f(*(p))
#define LOAD_BF16(p) bf2f(*(p))
#define FLOAT_TILE(NAME, T, LOAD, PF)                                                                 \
    INLINE void NAME(const T *w, i64 K, int R, const float *x, int C, float *out, i64 ldo) {         \
        for (int r = 0; r < R; r++)                                                                   \
            for (int c = 0; c < C; c++) {                                                             \
                float a = 0.0f;                                                                       \
                for (i64 k = 0; k < K; k++) a += LOAD(w + r * K + k) * x[c * K + k];                  \
                out[c * ldo + r] = a;                                                                 \
            }                                                                                         \
    }
#endif

/* fp32 weights are read one row at a time, without software prefetch: a single sequential stream
   that the hardware prefetcher keeps up with (stories110M fp32 decode +12% on 2 threads, +14% on 1,
   against two rows with prefetch). 16-bit rows keep two rows and the prefetch (one row without it:
   TinyLlama f16 decode -11%). */
FLOAT_TILE(tile_f32, float, LOAD_F32, 0)
FLOAT_TILE(tile_f16, uint16_t, LOAD_F16, 1)
FLOAT_TILE(tile_bf16, uint16_t, LOAD_BF16, 1)

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

#ifdef HERD_AVX2
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
#endif

/* q8: int8 weights with per-group scales (s points at row 0's scales; G per row). `half`: g = 16, so
   each block of 32 has two scales (lanes 0-3 of the block's integer sums cover its first 16 inputs,
   lanes 4-7 the other 16). The weights' and activations' scales are multiplied per row and token up
   front, so the inner loop is integer multiply-adds and one fused multiply-add per block. */
INLINE void tile_q8(const int8_t *w, const void *s, int s16, i64 g, i64 K, int R, const int8_t *xq,
                    const float *xd, int C, float *out, i64 ldo, int half) {
    i64 nb = K / 32, G = K / g, per = half ? 2 : 1;
    float comb[2][MAXC][per * nb];
    int fast = 0;
#ifdef HERD_AVX2
    if (g == 32 && nb >= 8) {
        fast = 1;
        for (int r = 0; r < R; r++)
            multipliers_g32((const char *)s + r * G * (s16 ? 2 : 4), NULL, 0.0f, s16, nb, C, xd, NULL, comb[r][0], nb, NULL);
    }
#endif
    for (int r = 0; r < R && !fast; r++)
        for (int c = 0; c < C; c++) {
            if (half)
                for (i64 i = 0; i < 2 * nb; i++) comb[r][c][i] = scale_at(s, s16, r * G + i) * xd[c * nb + i / 2];
            else
                block_multipliers((const char *)s + r * G * (s16 ? 2 : 4), s16, g / 32, nb, xd + c * nb, comb[r][c]);
        }
#ifdef HERD_AVX2
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
#else
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
#endif
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
#ifdef HERD_AVX2
    __m256 acc[2][MAXC];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
    if (bpg == 1 && nb >= 8) {
        fast = 1;
        for (int r = 0; r < R; r++)
            multipliers_g32((const char *)s + r * sb, (const char *)(m ? m : s) + r * sb, m ? 1.0f : -8.0f, s16, nb, C,
                            xd, xg, comb[r][0], nb, acc[r]);
    }
#endif
    for (int r = 0; r < R && !fast; r++)
        for (int c = 0; c < C; c++) {
            block_multipliers((const char *)s + r * sb, s16, bpg, nb, xd + c * nb, comb[r][c]);
            off[r][c] = m ? scaled_sum((const char *)m + r * sb, s16, G, xg + c * G)
                          : -8.0f * scaled_sum((const char *)s + r * sb, s16, G, xg + c * G);
        }
#ifdef HERD_AVX2
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

/* ---- a linear layer: its description, its prepared input, and a range of its rows ---- */

typedef struct {
    int fmt; /* 0 f32, 1 f16, 2 bf16, 3 q8, 4 q4 */
    int s16;
    i64 g, N, K;
    const void *w, *s, *m;
} Linear;

/* The input of a linear layer: x, and for q8/q4 x quantized per block of 32 (xq, xd, xs) with, for
   q4, the sums of the quantized inputs per weight group of g inputs (xg). Several layers reading the
   same x (wq, wk, wv; w1, w3) share one. */
typedef struct {
    const float *x;
    i64 M, K;
    int8_t *xq;
    float *xd, *xs, *xg;
    int quantized;
    i64 g;
} Input;

/* Buffers for an Input of up to M x K values. */
static Input input_alloc(i64 M, i64 K) {
    Input in = {0};
    in.xq = malloc(M * K);
    in.xd = malloc(M * (K / 32) * sizeof(float));
    in.xs = malloc(M * (K / 32) * sizeof(float));
    in.xg = malloc(M * (K / 32) * sizeof(float));
    return in;
}

static void input_free(Input *in) {
    free(in->xq);
    free(in->xd);
    free(in->xs);
    free(in->xg);
}

static void input_set(Input *in, const float *x, i64 M, i64 K) {
    in->x = x;
    in->M = M;
    in->K = K;
    in->quantized = 0;
    in->g = 0;
}

/* Whatever layer L needs of its input beyond x (single-threaded; cheap next to the layer). */
static void input_prepare(Input *in, const Linear *L) {
    if (L->fmt < 3) return;
    i64 nb = in->K / 32;
    if (!in->quantized) {
        quantize_x(in->x, in->M, in->K, in->xq, in->xd, in->xs);
        in->quantized = 1;
        in->g = 0;
    }
    if (L->fmt == 4 && in->g != L->g) {
        i64 bpg = L->g / 32;
        for (i64 i = 0; i < in->M * nb / bpg; i++) {
            float total = 0.0f;
            for (i64 j = 0; j < bpg; j++) total += in->xs[i * bpg + j];
            in->xg[i] = total;
        }
        in->g = L->g;
    }
}

/* Run TILE(R, C, n, m0) over rows [n0, n1) (in pairs; n0 even) and all tokens (in groups of MAXC).
   R and C are compile-time constants in every expansion. */
#define TILE_ROWS(TILE, R, C, n, m0)                                                                  \
    switch (C) {                                                                                      \
    case 1: TILE(R, 1, n, m0); break;                                                                 \
    case 2: TILE(R, 2, n, m0); break;                                                                 \
    case 3: TILE(R, 3, n, m0); break;                                                                 \
    case 4: TILE(R, 4, n, m0);                                                                        \
    }
#define TILES(n0, n1, N, M, TILE)                                                                     \
    for (i64 n = n0; n < n1; n += 2) {                                                                \
        for (i64 m0 = 0; m0 < M; m0 += MAXC) {                                                        \
            int C = M - m0 < MAXC ? (int)(M - m0) : MAXC;                                             \
            if (n + 1 < N) {                                                                          \
                TILE_ROWS(TILE, 2, C, n, m0)                                                          \
            } else {                                                                                  \
                TILE_ROWS(TILE, 1, C, n, m0)                                                          \
            }                                                                                         \
        }                                                                                             \
    }

#define SCALES(p, n) ((const char *)(p) + (n) * (K / L->g) * (L->s16 ? 2 : 4))
#define F32_TILE(R, C, n, m0)                                                                         \
    for (int r = 0; r < R; r++)                                                                       \
        tile_f32((const float *)L->w + (n + r) * K, K, 1, x + m0 * K, C, y + m0 * N + n + r, N)
#define F16_TILE(R, C, n, m0) tile_f16((const uint16_t *)L->w + n * K, K, R, x + m0 * K, C, y + m0 * N + n, N)
#define BF16_TILE(R, C, n, m0) tile_bf16((const uint16_t *)L->w + n * K, K, R, x + m0 * K, C, y + m0 * N + n, N)
#define Q8_TILE(R, C, n, m0)                                                                          \
    tile_q8((const int8_t *)L->w + n * K, SCALES(L->s, n), L->s16, L->g, K, R, in->xq + m0 * K,       \
            in->xd + m0 * (K / 32), C, y + m0 * N + n, N, L->g == 16)
#define Q4_TILE(R, C, n, m0)                                                                          \
    tile_q4((const uint8_t *)L->w + n * K / 2, SCALES(L->s, n), L->m ? SCALES(L->m, n) : NULL, L->s16, \
            L->g, K, R, in->xq + m0 * K, in->xd + m0 * (K / 32), in->xg + m0 * (K / L->g), C,          \
            y + m0 * N + n, N)

/* y[:, n0:n1] = x W[n0:n1]^T for a prepared input (n0 even). Every (row, token) dot product is
   computed the same way whatever the range, so splitting rows between threads changes nothing. */
static void linear_rows(const Linear *L, const Input *in, i64 n0, i64 n1, float *y) {
    i64 M = in->M, K = L->K, N = L->N;
    const float *x = in->x;
    switch (L->fmt) {
    case 0: TILES(n0, n1, N, M, F32_TILE) break;
    case 1: TILES(n0, n1, N, M, F16_TILE) break;
    case 2: TILES(n0, n1, N, M, BF16_TILE) break;
    case 3: TILES(n0, n1, N, M, Q8_TILE) break;
    default: TILES(n0, n1, N, M, Q4_TILE)
    }
}

/* Thread t of nt's share [*n0, *n1) of N rows, in whole pairs (*n1 may be N + 1 when N is odd). */
static void share(i64 N, int t, int nt, i64 *n0, i64 *n1) {
    i64 pairs = (N + 1) / 2;
    *n0 = 2 * (pairs * t / nt);
    *n1 = 2 * (pairs * (t + 1) / nt);
}

/* Thread t of nt's share of layer L's rows. */
static void linear_share(const Linear *L, const Input *in, int t, int nt, float *y) {
    i64 n0, n1;
    share(L->N, t, nt, &n0, &n1);
    linear_rows(L, in, n0, n1, y);
}

/* ---- threads: one OpenMP team per call, meeting at a spin-then-sleep barrier ----
 *
 * herd sets OMP_WAIT_POLICY=passive (torch's threads must not spin while Python runs), so every
 * OpenMP fork or barrier puts a thread to sleep and wakes it with a system call: tens of
 * microseconds in a virtual machine, dozens of times per token. Instead a whole call runs in one
 * parallel region whose threads meet at this barrier: it spins for ~30 us (the usual wait, when the
 * threads' shares are even) and then sleeps on a futex, so that a thread descheduled by another
 * process does not keep its partner spinning for a whole time slice.
 */

#ifdef _OPENMP
#define THREAD_ID omp_get_thread_num()
#define THREAD_COUNT omp_get_num_threads()
#else
#define THREAD_ID 0
#define THREAD_COUNT 1
#endif

#define SPINS 1000

typedef struct {
    _Atomic int arrived, phase, sleepers;
} Barrier;

#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
static void sleep_while(_Atomic int *word, int value) {
    syscall(SYS_futex, (int *)word, FUTEX_WAIT_PRIVATE, value, NULL, NULL, 0);
}
static void wake_all(_Atomic int *word) {
    syscall(SYS_futex, (int *)word, FUTEX_WAKE_PRIVATE, 1 << 30, NULL, NULL, 0);
}
#else
static void sleep_while(_Atomic int *word, int value) {
    (void)word;
    (void)value;
    sched_yield();
}
static void wake_all(_Atomic int *word) { (void)word; }
#endif

static void barrier_wait(Barrier *b, int nt) {
    if (nt == 1) return;
    int phase = atomic_load(&b->phase);
    if (atomic_fetch_add(&b->arrived, 1) == nt - 1) {
        atomic_store(&b->arrived, 0);
        atomic_store(&b->phase, phase + 1);
        if (atomic_load(&b->sleepers)) wake_all(&b->phase);
        return;
    }
    for (int i = 0; atomic_load(&b->phase) == phase; i++) {
        if (i < SPINS) {
#ifdef HERD_AVX2
            _mm_pause();
#endif
        } else {
            atomic_fetch_add(&b->sleepers, 1);
            sleep_while(&b->phase, phase); /* returns at once if the phase has moved on */
            atomic_fetch_sub(&b->sleepers, 1);
        }
    }
}

/* ---- entry points ---- */

/* y[M, N] = x[M, K] W^T */
void herd_linear(const Linear *L, const float *x, i64 M, float *y, int threads) {
    Input in = input_alloc(M, L->K);
    input_set(&in, x, M, L->K);
    input_prepare(&in, L);
#pragma omp parallel num_threads(threads)
    linear_share(L, &in, THREAD_ID, THREAD_COUNT, y);
    input_free(&in);
}

/* ---- many tokens (prefill): a blocked matrix multiply on weights expanded to fp32 ----
 *
 * With dozens of tokens per weight the time is arithmetic, not memory, so this is laid out like
 * BLIS's kernels: for each slice of KC inputs (all tokens' slice of x, packed PT tokens at a time,
 * stays in L2) each thread expands PR = 16 of its rows to fp32 in a panel stored input-major
 * (panel[k * PR + r], 32 KB), then multiplies it with PT = 6 tokens at a time: per input, the
 * panel's two 8-row vectors times six broadcast activations into 12 sums held in registers, with no
 * horizontal sums.
 * Activations stay fp32 (unlike herd_linear): the arithmetic of F.linear on the dequantized weight.
 */
#define KC 512
#define PR 16
#define PT 6

#ifndef HERD_AVX2
/* element k of row n of W as fp32 */
static float weight_at(const Linear *L, i64 n, i64 k) {
    i64 K = L->K, G = L->g ? K / L->g : 0, i = n * K + k;
    switch (L->fmt) {
    case 0: return ((const float *)L->w)[i];
    case 1: return h2f(((const uint16_t *)L->w)[i]);
    case 2: return bf2f(((const uint16_t *)L->w)[i]);
    case 3: return ((const int8_t *)L->w)[i] * scale_at(L->s, L->s16, n * G + k / L->g);
    default: {
        uint8_t byte = ((const uint8_t *)L->w)[(i - k % 64) / 2 + k % 32];
        i64 gi = n * G + k / L->g;
        float sc = scale_at(L->s, L->s16, gi);
        return (float)(k % 64 < 32 ? byte & 15 : byte >> 4) * sc + (L->m ? scale_at(L->m, L->s16, gi) : -8.0f * sc);
    }
    }
}
#endif

#ifdef HERD_AVX2
/* inputs [k, k + 8) of row n of W as fp32 (k a multiple of 8; `gk` = k / g for q8 and q4; `fmt` a
   constant where inlined) */
INLINE __m256 row8(const Linear *L, int fmt, i64 n, i64 k, i64 gk) {
    i64 i = n * L->K + k, gi = n * (L->g ? L->K / L->g : 0) + gk;
    switch (fmt) {
    case 0: return _mm256_loadu_ps((const float *)L->w + i);
    case 1: return LOAD_F16((const uint16_t *)L->w + i);
    case 2: return LOAD_BF16((const uint16_t *)L->w + i);
    case 3: {
        __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)L->w + i))));
        return _mm256_mul_ps(q, _mm256_set1_ps(scale_at(L->s, L->s16, gi)));
    }
    default: {
        __m128i b = _mm_loadl_epi64((const __m128i *)((const uint8_t *)L->w + (i - k % 64) / 2 + k % 32));
        if (k % 64 >= 32) b = _mm_srli_epi16(b, 4);
        __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_cvtepu8_epi32(b), _mm256_set1_epi32(15)));
        float sc = scale_at(L->s, L->s16, gi);
        return _mm256_fmadd_ps(q, _mm256_set1_ps(sc), _mm256_set1_ps(L->m ? scale_at(L->m, L->s16, gi) : -8.0f * sc));
    }
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
        for (i64 k = 0, gk = L.g ? k0 / L.g : 0, gend = L.g ? (gk + 1) * L.g : 0; k < kc; k += 8) {
            if (L.g && k0 + k == gend) { /* next scale group (no division per block) */
                gk++;
                gend += L.g;
            }
            __m256 v[8];
            for (int r = 0; r < 8; r++) v[r] = h + r < R ? row8(&L, fmt, n + h + r, k0 + k, gk) : _mm256_setzero_ps();
            transpose8(v);
            for (int j = 0; j < 8; j++) _mm256_store_ps(panel + (k + j) * PR + h, v[j]);
        }
}
#endif

/* rows [n, n + R) of W, inputs [k0, k0 + kc), as fp32 in panel[k * PR + r]; rows past R are zero */
static void expand(const Linear *L, i64 n, int R, i64 k0, i64 kc, float *panel) {
#ifdef HERD_AVX2
    switch (L->fmt) {
    case 0: expand_fmt(L, 0, n, R, k0, kc, panel); break;
    case 1: expand_fmt(L, 1, n, R, k0, kc, panel); break;
    case 2: expand_fmt(L, 2, n, R, k0, kc, panel); break;
    case 3: expand_fmt(L, 3, n, R, k0, kc, panel); break;
    default: expand_fmt(L, 4, n, R, k0, kc, panel);
    }
#else
    for (i64 k = 0; k < kc; k++)
        for (int r = 0; r < PR; r++) panel[k * PR + r] = r < R ? weight_at(L, n + r, k0 + k) : 0.0f;
#endif
}

/* Bring rows [n, n + PR) of W, inputs [k0, k0 + kc), toward the cache: the next panel's weights,
   fetched while this panel is multiplied (otherwise expand() waits on memory line by line) */
static void prefetch_panel(const Linear *L, i64 n, i64 k0, i64 kc) {
    static const int bits[] = {32, 16, 16, 8, 4};
    i64 b = bits[L->fmt];
    for (int r = 0; r < PR && n + r < L->N; r++) {
        const char *row = (const char *)L->w + ((n + r) * L->K + k0) * b / 8;
        for (i64 off = 0; off < kc * b / 8; off += 64) __builtin_prefetch(row + off, 0, 2);
    }
}

/* y[c * N + r] (+= when `add`) sum over k < kc of panel[k * PR + r] * xp[k * PT + c], for r < R and
   c < C (a compile-time constant where inlined) */
INLINE void micro(const float *panel, i64 kc, const float *xp, int C, int R, float *y, i64 N, int add) {
    float part[PT][PR];
#ifdef HERD_AVX2
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
#else
    for (int c = 0; c < C; c++)
        for (int r = 0; r < R; r++) {
            part[c][r] = 0.0f;
            for (i64 k = 0; k < kc; k++) part[c][r] += panel[k * PR + r] * xp[k * PT + c];
        }
#endif
    for (int c = 0; c < C; c++)
        for (int r = 0; r < R; r++) y[c * N + r] = add ? y[c * N + r] + part[c][r] : part[c][r];
}

/* y[:, n0:n1] = x W[n0:n1]^T; xp: room for M (rounded up to PT) x KC floats */
static void matmul_rows(const Linear *L, const float *x, i64 M, i64 n0, i64 n1, float *y, float *xp) {
    i64 K = L->K, N = L->N;
    float panel[KC * PR] __attribute__((aligned(32)));
    for (i64 k0 = 0; k0 < K; k0 += KC) {
        i64 kc = K - k0 < KC ? K - k0 : KC;
        /* this slice of x, PT tokens at a time, input-major: one stream for the tile to broadcast from */
        for (i64 m = 0; m < M; m += PT)
            for (i64 k = 0; k < kc; k++)
                for (i64 c = 0; c < PT; c++) xp[m * kc + k * PT + c] = m + c < M ? x[(m + c) * K + k0 + k] : 0.0f;
        for (i64 n = n0; n < n1; n += PR) {
            int R = n1 - n < PR ? (int)(n1 - n) : PR;
            expand(L, n, R, k0, kc, panel);
            prefetch_panel(L, n + PR, k0, kc);
            for (i64 m = 0; m < M; m += PT) {
                const float *xm = xp + m * kc;
                float *ym = y + m * N + n;
                if (k0 > 0) /* the sums the next tile adds to, out of cache since the last slice */
                    for (i64 c = m + PT; c < m + 2 * PT && c < M; c++) PREFETCH(y + c * N + n);
                switch (M - m < PT ? M - m : PT) {
                case 1: micro(panel, kc, xm, 1, R, ym, N, k0 > 0); break;
                case 2: micro(panel, kc, xm, 2, R, ym, N, k0 > 0); break;
                case 3: micro(panel, kc, xm, 3, R, ym, N, k0 > 0); break;
                case 4: micro(panel, kc, xm, 4, R, ym, N, k0 > 0); break;
                case 5: micro(panel, kc, xm, 5, R, ym, N, k0 > 0); break;
                default: micro(panel, kc, xm, 6, R, ym, N, k0 > 0);
                }
            }
        }
    }
}

/* y[M, N] = x[M, K] W^T for many tokens (prefill) */
void herd_matmul(const Linear *L, const float *x, i64 M, float *y, int threads) {
#pragma omp parallel num_threads(threads)
    {
        i64 panels = (L->N + PR - 1) / PR;
        int t = THREAD_ID, nt = THREAD_COUNT;
        i64 n0 = PR * (panels * t / nt), n1 = PR * (panels * (t + 1) / nt);
        float *xp = malloc((M + PT) * KC * sizeof(float));
        matmul_rows(L, x, M, n0, n1 < L->N ? n1 : L->N, y, xp);
        free(xp);
    }
}

/* ---- the whole forward pass for a few tokens with a KV cache (decode steps) ----
 *
 * The same computation as herd.model.Transformer.forward with a cache, for B rows of T tokens,
 * each token at its own position: one call per step instead of dozens of torch operations per
 * layer. Embeddings (any format) and rotary angles come in from torch; logits go out.
 */

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

/* softmax(q K^T * scale) V over cache positions 0..p of one head */
static void attend(const float *q, const float *ks, const float *vs, i64 p, i64 D, float scale, float *sc,
                   float *out) {
    float mx = -INFINITY, sum = 0.0f;
    for (i64 j = 0; j <= p; j++) {
        sc[j] = dot(q, ks + j * D, D) * scale;
        mx = sc[j] > mx ? sc[j] : mx;
    }
    for (i64 j = 0; j <= p; j++) {
        sc[j] = expf(sc[j] - mx);
        sum += sc[j];
    }
    for (i64 d = 0; d < D; d++) out[d] = 0.0f;
    for (i64 j = 0; j <= p; j++) {
        float pj = sc[j] / sum;
        const float *vj = vs + j * D;
        for (i64 d = 0; d < D; d++) out[d] += pj * vj[d];
    }
}

void herd_forward(const Step *st) {
    const Model *md = st->model;
    i64 M = st->B * st->T, dim = md->dim, H = md->n_heads, KVH = md->n_kv_heads, D = md->head_dim;
    i64 S = st->cache_len, CR = st->cache_rows;
    i64 widest = dim > md->hidden ? dim : md->hidden;
    if (H * D > widest) widest = H * D;
    float *x = st->x;
    float *xn = malloc(M * dim * sizeof(float)), *q = malloc(M * H * D * sizeof(float));
    float *k = malloc(M * KVH * D * sizeof(float)), *v = malloc(M * KVH * D * sizeof(float));
    float *att = malloc(M * H * D * sizeof(float)), *o = malloc(M * dim * sizeof(float));
    float *h1 = malloc(M * md->hidden * sizeof(float)), *h3 = malloc(M * md->hidden * sizeof(float));
    float *scores = malloc((size_t)st->threads * S * sizeof(float));
    float scale = 1.0f / sqrtf((float)D);
    Input in = input_alloc(M, widest);
    Barrier bar = {0};
    i64 n_out = st->logits_at ? st->B : M;

    /* Thread 0 does the cheap serial work (norms, rope, cache writes, input quantization) while the
       others wait at the barrier; every thread takes a share of each layer's rows and of the heads. */
#pragma omp parallel num_threads(st->threads)
    {
        int t = THREAD_ID, nt = THREAD_COUNT;
#ifdef HERD_AVX2
        /* flush denormals to zero: attention weights far below the largest are denormal, and
           arithmetic on denormals is ~100x slower */
        unsigned csr = _mm_getcsr();
        _mm_setcsr(csr | 0x8040);
#endif
        for (i64 l = 0; l < md->n_layers; l++) {
            const Layer *L = md->layers + l;
            float *kc = st->k_cache + l * CR * KVH * S * D, *vc = st->v_cache + l * CR * KVH * S * D;
            if (t == 0) {
                rmsnorm(x, L->attn_norm, M, dim, md->eps, xn);
                input_set(&in, xn, M, dim);
                input_prepare(&in, &L->wq);
                input_prepare(&in, &L->wk);
                input_prepare(&in, &L->wv);
            }
            barrier_wait(&bar, nt);
            linear_share(&L->wq, &in, t, nt, q);
            linear_share(&L->wk, &in, t, nt, k);
            linear_share(&L->wv, &in, t, nt, v);
            barrier_wait(&bar, nt);
            if (t == 0) {
                rope(q, M, H, D, st->cos, st->sin);
                rope(k, M, KVH, D, st->cos, st->sin);
                for (i64 i = 0; i < M; i++) {
                    i64 row = st->rows[i / st->T], p = st->pos[i];
                    for (i64 h = 0; h < KVH; h++) {
                        memcpy(kc + ((row * KVH + h) * S + p) * D, k + (i * KVH + h) * D, D * sizeof(float));
                        memcpy(vc + ((row * KVH + h) * S + p) * D, v + (i * KVH + h) * D, D * sizeof(float));
                    }
                }
            }
            barrier_wait(&bar, nt);
            for (i64 ih = t; ih < M * H; ih += nt) {
                i64 i = ih / H, kvh = ih % H / (H / KVH), row = st->rows[i / st->T];
                attend(q + ih * D, kc + (row * KVH + kvh) * S * D, vc + (row * KVH + kvh) * S * D, st->pos[i], D,
                       scale, scores + t * S, att + ih * D);
            }
            barrier_wait(&bar, nt);
            if (t == 0) {
                input_set(&in, att, M, H * D);
                input_prepare(&in, &L->wo);
            }
            barrier_wait(&bar, nt);
            linear_share(&L->wo, &in, t, nt, o);
            barrier_wait(&bar, nt);
            if (t == 0) {
                for (i64 j = 0; j < M * dim; j++) x[j] += o[j];
                rmsnorm(x, L->ffn_norm, M, dim, md->eps, xn);
                input_set(&in, xn, M, dim);
                input_prepare(&in, &L->w1);
                input_prepare(&in, &L->w3);
            }
            barrier_wait(&bar, nt);
            linear_share(&L->w1, &in, t, nt, h1);
            linear_share(&L->w3, &in, t, nt, h3);
            i64 j0, j1; /* each thread gates the hidden units it computed */
            share(md->hidden, t, nt, &j0, &j1);
            if (j1 > md->hidden) j1 = md->hidden;
            for (i64 i = 0; i < M; i++)
                for (i64 j = i * md->hidden + j0; j < i * md->hidden + j1; j++) h1[j] = h1[j] / (1.0f + expf(-h1[j])) * h3[j];
            barrier_wait(&bar, nt);
            if (t == 0) {
                input_set(&in, h1, M, md->hidden);
                input_prepare(&in, &L->w2);
            }
            barrier_wait(&bar, nt);
            linear_share(&L->w2, &in, t, nt, o);
            barrier_wait(&bar, nt);
            if (t == 0)
                for (i64 j = 0; j < M * dim; j++) x[j] += o[j];
        }
        if (t == 0) {
            if (st->logits_at) /* keep one token per row */
                for (i64 b = 0; b < st->B; b++)
                    memmove(x + b * dim, x + (b * st->T + st->logits_at[b]) * dim, dim * sizeof(float));
            rmsnorm(x, md->norm, n_out, dim, md->eps, xn);
            input_set(&in, xn, n_out, dim);
            input_prepare(&in, &md->output);
        }
        barrier_wait(&bar, nt);
        linear_share(&md->output, &in, t, nt, st->logits);
#ifdef HERD_AVX2
        _mm_setcsr(csr);
#endif
    }
    input_free(&in);
    free(xn); free(q); free(k); free(v); free(att); free(o); free(h1); free(h3); free(scores);
}
