/* The input of a linear layer (activations.h): quantized per block of 32 as llama.cpp quantizes
 * the activations beside Q8_0, Q4_0 (block_q8_0) and Q4_1 weights (block_q8_1). */
#include "activations.h"

#ifdef HERD_AVX2
#include "avx2/activations.h"
#else
#include "portable/activations.h"
#endif

static void quantize_x(const float *x, i64 M, i64 K, int8_t *xq, float *xd, float *xs) {
    for (i64 i = 0; i < M * (K / 32); i++) quantize_block(x + i * 32, xq + i * 32, xd + i, xs + i);
}

Input input_alloc(i64 M, i64 K) {
    Input in = {0};
    in.xq = malloc(M * K);
    in.xd = malloc(M * (K / 32) * sizeof(float));
    in.xs = malloc(M * (K / 32) * sizeof(float));
    in.xg = malloc(M * (K / 32) * sizeof(float));
    return in;
}

void input_free(Input *in) {
    free(in->xq);
    free(in->xd);
    free(in->xs);
    free(in->xg);
}

void input_set(Input *in, const float *x, i64 M, i64 K) {
    in->x = x;
    in->M = M;
    in->K = K;
    in->quantized = 0;
    in->g = 0;
}

void input_prepare(Input *in, const Linear *L) {
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
