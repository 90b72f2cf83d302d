/* One tile: R weight rows (1 or 2, ldw = K apart) against C tokens (up to MAXC), out[c * ldo + r].
 * A tile is the unit of work of the decode kernels (linear.c): each weight is read once per tile and
 * used for every token. The float tiles (tile_f32, tile_f16, tile_bf16), tile_q8 and tile_q4 come
 * from avx2/tiles.h or portable/tiles.h.
 */
#pragma once

#include "common.h"

#define MAXC 4 /* tokens per tile */

/* The offsets of asymmetric int4 weights against quantized activations, for R rows (G groups of
   offsets each, sb bytes apart) and C tokens: off[r][c] = the sum over the groups of m[gi] * xg[c * G + gi],
   one group after another (llama.cpp's summs in ggml_vec_dot_q4_1_q8_1); the R * C sums advance
   together, so that their fused multiply-adds overlap. */
INLINE void offsets(const void *m, int s16, i64 G, i64 sb, int R, const float *xg, int C, float off[2][MAXC]) {
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) off[r][c] = 0.0f;
    for (i64 i = 0; i < G; i++)
        for (int r = 0; r < R; r++) {
            float mr = scale_at((const char *)m + r * sb, s16, i);
            for (int c = 0; c < C; c++) off[r][c] = fmaf(mr, xg[c * G + i], off[r][c]);
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
