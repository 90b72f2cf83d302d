/* herd's CPU kernels for weight-only quantized and 16-bit linear layers: the interface with Python.
 *
 * Decoding one token multiplies every weight matrix by one activation vector: the time is the time
 * to stream the weights from memory, so the decode kernels (herd_linear, herd_forward) read each
 * weight once per call, keep it compressed in memory and expand it in registers. Prefill (dozens of
 * tokens) is arithmetic-bound instead: for fp32 and 16-bit weights herd_matmul is a blocked matrix
 * multiply on weights expanded to fp32 (gemm.c); int8 and int4 weights multiply int8 activations
 * in the decode kernels for any number of tokens, as llama.cpp does. Matrices are row-major [N, K] (out x in), as in torch.nn.Linear; x is [M, K]
 * (one row per token), y is [M, N].
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
 * For q8 and q4 the activations are quantized to int8 per block of 32 exactly as llama.cpp's x86 CPU
 * backend quantizes them (block_q8_0 / block_q8_1: scale and sum rounded to fp16), and each dot
 * product is summed in the order of its ggml_vec_dot_q8_0_q8_0 / q4_0_q8_0 / q4_1_q8_1 (8 lanes,
 * one fused multiply-add per block, hsum_float_8), so that a GGUF's quants give llama.cpp's numbers.
 * Every (row, token) dot product is computed in the same order whatever M is: a token's result
 * does not depend on the other tokens of the call.
 *
 * herd/quant/native.py builds the library at first use with the system C compiler, once per
 * instruction set (generic, AVX2, AVX-512 + VNNI; isa.c says which the CPU runs), and declares the
 * structs below again as ctypes Structures; the library exports their layout (herd_layout,
 * layout.c) and native.py refuses a library whose layout differs.
 *
 * The files: common.h (what every file uses), activations.c (int8 activations), tiles.h (a few
 * weight rows against a few tokens), linear.c (a layer's rows shared between threads; herd_linear),
 * gemm.c (herd_matmul), forward.c (herd_forward), threads.h and .c (thread ids, the barrier),
 * layout.c (herd_layout), isa.c (herd_cpu_has). Each generic file X takes the code that depends on
 * the instruction set from avx2/X.h (AVX2 with FMA and F16C; avx512/X.h adds what AVX-512 changes)
 * or portable/X.h (plain C).
 */
#pragma once

#include <stdint.h>

typedef int64_t i64;

/* the library's entry points; everything else is hidden (built with -fvisibility=hidden) */
#define HERD_EXPORT __attribute__((visibility("default")))

/* A weight matrix. */
typedef struct {
    int fmt; /* 0 f32, 1 f16, 2 bf16, 3 q8, 4 q4 */
    int s16;
    i64 g, N, K;
    const void *w, *s, *m;
} Linear;

/* ---- the forward pass for a few tokens with a KV cache (decode steps; forward.c) ---- */

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

/* One line of the layout of the structs above: a struct's size (field NULL), or one field's offset
   and size. The table ends with a line whose type is NULL. */
typedef struct {
    const char *type, *field;
    i64 offset, size;
} LayoutLine;

/* y[M, N] = x[M, K] W^T for a few tokens (decode; linear.c) */
HERD_EXPORT void herd_linear(const Linear *L, const float *x, i64 M, float *y, int threads);
/* y[M, N] = x[M, K] W^T for many tokens (prefill; gemm.c) */
HERD_EXPORT void herd_matmul(const Linear *L, const float *x, i64 M, float *y, int threads);
/* the whole forward pass of a decode step (forward.c) */
HERD_EXPORT void herd_forward(const Step *st);
/* the layout of Linear, Layer, Model and Step (layout.c) */
HERD_EXPORT const LayoutLine *herd_layout(void);
/* whether this CPU runs instruction set `isa` (isa.c) */
HERD_EXPORT int herd_cpu_has(int isa);
