/* The input of a linear layer: x, and for q8/q4 x quantized to int8 per block of 32 (as llama.cpp
 * does), so that the tiles' inner loops are integer multiply-adds. */
#pragma once

#include "common.h"

/* x, and for q8/q4 x quantized per block of 32 (xq, the blocks' scales xd, and xs: each block's
   scale times the sum of its quantized values; both rounded to fp16, as in llama.cpp's block_q8_1)
   with, for q4, the sums of xs per weight group of g inputs (xg). Several layers reading the same x
   (wq, wk, wv; w1, w3) share one. */
typedef struct {
    const float *x;
    i64 M, K;
    int8_t *xq;
    float *xd, *xs, *xg;
    int quantized;
    i64 g;
} Input;

/* Buffers for an Input of up to M x K values. */
Input input_alloc(i64 M, i64 K);
void input_free(Input *in);
/* Make x [M, K] the input, nothing prepared yet. */
void input_set(Input *in, const float *x, i64 M, i64 K);
/* Whatever layer L needs of its input beyond x (single-threaded; cheap next to the layer). */
void input_prepare(Input *in, const Linear *L);
