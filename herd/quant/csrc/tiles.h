/* One tile: R weight rows (1 or 2, ldw = K apart) against C tokens (up to MAXC), out[c * ldo + r].
 * A tile is the unit of work of the decode kernels (linear.c): each weight is read once per tile and
 * used for every token. The float tiles (tile_f32, tile_f16, tile_bf16), tile_q8 and tile_q4 come
 * from avx2/tiles.h or portable/tiles.h.
 */
#pragma once

#include "common.h"

#define MAXC 4 /* tokens per tile */

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
