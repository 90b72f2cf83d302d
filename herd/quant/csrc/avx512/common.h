/* The AVX-512 half of common.h: what differs from avx2/common.h (included before it, which leaves
 * out what this file defines). VNNI's vpdpbusd multiplies bytes and sums them four at a time in one
 * instruction, where AVX2 takes two (vpmaddubsw and vpmaddwd); the sums are the same integers. */
#pragma once

/* acc + the 8 sums of 4 adjacent products of a (unsigned bytes) and b (signed bytes) */
INLINE __m256i dot_us(__m256i acc, __m256i a, __m256i b) { return _mm256_dpbusd_epi32(acc, a, b); }
