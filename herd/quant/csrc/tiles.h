/* One tile: R weight rows (1 or 2, ldw = K apart) against C tokens (up to MAXC), out[c * ldo + r].
 * A tile is the unit of work of the decode kernels (linear.c): each weight is read once per tile and
 * used for every token. The float tiles (tile_f32, tile_f16, tile_bf16), tile_q8 and tile_q4 come
 * from avx2/tiles.h or portable/tiles.h; the scale bookkeeping they share is here.
 */
#pragma once

#include "common.h"

#define MAXC 4 /* tokens per tile */

/* For q8 weights with groups of g inputs (s points at row 0's scales; K / g per row): the weights'
   and activations' scales multiplied per row and token up front, comb[r][c][b] = s[group of b] *
   xd[c * nb + b], so that the inner loop is integer multiply-adds and one fused multiply-add per
   block. `half`: g = 16, so each block of 32 has two scales (comb[r][c][2 * b], [2 * b + 1]). */
INLINE void q8_multipliers(const void *s, int s16, i64 g, i64 K, int R, const float *xd, int C, int half, i64 n,
                           float comb[][MAXC][n]) {
    i64 nb = K / 32, G = K / g;
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            if (half)
                for (i64 i = 0; i < 2 * nb; i++) comb[r][c][i] = scale_at(s, s16, r * G + i) * xd[c * nb + i / 2];
            else
                block_multipliers((const char *)s + r * G * (s16 ? 2 : 4), s16, g / 32, nb, xd + c * nb, comb[r][c]);
        }
}

/* For q4 weights with scales s and offsets m (NULL: symmetric, -8 s) per group of g inputs: comb as
   for q8, and off[r][c], the offsets' part of the dot product: the sum over groups of m times
   xg[c * G + group] (the sum of token c's quantized inputs over the group). */
INLINE void q4_multipliers(const void *s, const void *m, int s16, i64 g, i64 K, int R, const float *xd,
                           const float *xg, int C, i64 nb, float comb[][MAXC][nb], float off[][MAXC]) {
    i64 bpg = g / 32, G = K / g, sb = G * (s16 ? 2 : 4);
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            block_multipliers((const char *)s + r * sb, s16, bpg, nb, xd + c * nb, comb[r][c]);
            off[r][c] = m ? scaled_sum((const char *)m + r * sb, s16, G, xg + c * G)
                          : -8.0f * scaled_sum((const char *)s + r * sb, s16, G, xg + c * G);
        }
}

#ifdef HERD_AVX2
#include "avx2/tiles.h"
#else
#include "portable/tiles.h"
#endif

/* fp32 weights are read one row at a time, without software prefetch: a single sequential stream
   that the hardware prefetcher keeps up with (stories110M fp32 decode +12% on 2 threads, +14% on 1,
   against two rows with prefetch). 16-bit rows keep two rows and the prefetch (one row without it:
   TinyLlama f16 decode -11%). */
FLOAT_TILE(tile_f32, float, LOAD_F32, 0)
FLOAT_TILE(tile_f16, uint16_t, LOAD_F16, 1)
FLOAT_TILE(tile_bf16, uint16_t, LOAD_BF16, 1)
