/* Many tokens (prefill) of fp32 and 16-bit weights: a blocked matrix multiply on weights expanded
 * to fp32 (gemm.c). int8 and int4 weights go to herd_linear whatever the number of tokens.
 *
 * With dozens of tokens per weight the time is arithmetic, not memory, so this is laid out like
 * BLIS's kernels: for each slice of KC inputs (all tokens' slice of x, packed PT tokens at a time,
 * stays in L2) each thread expands PR = 16 of its rows to fp32 in a panel stored input-major
 * (panel[k * PR + r], 32 KB), then multiplies it with PT = 6 tokens at a time: per input, the
 * panel's two 8-row vectors times six broadcast activations into 12 sums held in registers, with no
 * horizontal sums.
 * Activations stay fp32: the arithmetic of F.linear on the weight as fp32.
 *
 * expand (a panel) and micro (a panel times PT tokens) come from avx2/gemm.h or portable/gemm.h.
 */
#pragma once

#include "common.h"

#define KC 512
#define PR 16
#define PT 6

#ifdef HERD_AVX2
#include "avx2/gemm.h"
#else
#include "portable/gemm.h"
#endif
