/* The peak arithmetic of one core, for `herd bench --kernels`: CHAINS independent chains of the
   widest multiply-add of each instruction set, enough to cover the instructions' latency, so the
   loop runs at the issue rate of its units. Each function returns a value that depends on every
   chain so that nothing is optimised away. Built without -march: each function names its target
   and Python calls only those the CPU has. */
#include <immintrin.h>
#include <stdint.h>

#define CHAINS 12
#define CHAIN_LOOP(body) for (int64_t i = 0; i < iters; i++) { _Pragma("GCC unroll 12") \
    for (int c = 0; c < CHAINS; c++) body; }

__attribute__((target("avx2,fma"))) float herd_peak_fma256(int64_t iters) {
    __m256 acc[CHAINS], m = _mm256_set1_ps(0.999f), a = _mm256_set1_ps(1e-3f), s = _mm256_setzero_ps();
    for (int c = 0; c < CHAINS; c++) acc[c] = _mm256_set1_ps((float)c);
    CHAIN_LOOP(acc[c] = _mm256_fmadd_ps(acc[c], m, a))
    for (int c = 0; c < CHAINS; c++) s = _mm256_add_ps(s, acc[c]);
    return s[0];
}

__attribute__((target("avx512f"))) float herd_peak_fma512(int64_t iters) {
    __m512 acc[CHAINS], m = _mm512_set1_ps(0.999f), a = _mm512_set1_ps(1e-3f), s = _mm512_setzero_ps();
    for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_set1_ps((float)c);
    CHAIN_LOOP(acc[c] = _mm512_fmadd_ps(acc[c], m, a))
    for (int c = 0; c < CHAINS; c++) s = _mm512_add_ps(s, acc[c]);
    return s[0];
}

/* AVX2's int8 dot product: u8 x s8 pairs summed to s16 (maddubs), pairs of those to s32 (madd) */
__attribute__((target("avx2"))) float herd_peak_int8_avx2(int64_t iters) {
    __m256i acc[CHAINS], u = _mm256_set1_epi8(3), w = _mm256_set1_epi8(-5), one = _mm256_set1_epi16(1);
    __m256i s = _mm256_setzero_si256();
    for (int c = 0; c < CHAINS; c++) acc[c] = _mm256_set1_epi32(c);
    CHAIN_LOOP(acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(_mm256_maddubs_epi16(u, w), one)))
    for (int c = 0; c < CHAINS; c++) s = _mm256_add_epi32(s, acc[c]);
    return (float)_mm256_extract_epi32(s, 0);
}

__attribute__((target("avx512f,avx512vl,avx512vnni"))) float herd_peak_vnni256(int64_t iters) {
    __m256i acc[CHAINS], u = _mm256_set1_epi8(3), w = _mm256_set1_epi8(-5), s = _mm256_setzero_si256();
    for (int c = 0; c < CHAINS; c++) acc[c] = _mm256_set1_epi32(c);
    CHAIN_LOOP(acc[c] = _mm256_dpbusd_epi32(acc[c], u, w))
    for (int c = 0; c < CHAINS; c++) s = _mm256_add_epi32(s, acc[c]);
    return (float)_mm256_extract_epi32(s, 0);
}

__attribute__((target("avx512f,avx512vnni"))) float herd_peak_vnni512(int64_t iters) {
    __m512i acc[CHAINS], u = _mm512_set1_epi8(3), w = _mm512_set1_epi8(-5), s = _mm512_setzero_si512();
    for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_set1_epi32(c);
    CHAIN_LOOP(acc[c] = _mm512_dpbusd_epi32(acc[c], u, w))
    for (int c = 0; c < CHAINS; c++) s = _mm512_add_epi32(s, acc[c]);
    return (float)_mm512_reduce_add_epi32(s);
}
