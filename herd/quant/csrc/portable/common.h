/* The plain C half of common.h: what avx2/common.h does with vector instructions, one number at a
 * time. */
#pragma once

INLINE float h2f(uint16_t h) {
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
}

/* x as fp16, rounded to nearest even (F16C's vcvtps2ph, which llama.cpp uses on x86) */
INLINE uint16_t f2h(float x) {
    uint32_t bits;
    memcpy(&bits, &x, 4);
    uint32_t sign = (bits >> 16) & 0x8000, ax = bits & 0x7fffffff;
    if (ax > 0x7f800000) return (uint16_t)(sign | 0x7e00); /* NaN */
    if (ax >= 0x477ff000) return (uint16_t)(sign | 0x7c00); /* rounds to 65536 or more: infinity */
    if (ax < 0x38800000) /* below 2^-14: a multiple of 2^-24 (1024 is the smallest normal's bits) */
        return (uint16_t)(sign | (uint32_t)nearbyintf(fabsf(x) * 16777216.0f));
    return (uint16_t)(sign | ((ax - 0x38000000 + 0xfff + ((ax >> 13) & 1)) >> 13));
}

/* a weight at p as a float */
#define LOAD_F32(p) (*(p))
#define LOAD_F16(p) h2f(*(p))
#define LOAD_BF16(p) bf2f(*(p))

INLINE float dot(const float *a, const float *b, i64 n) {
    float total = 0.0f;
    for (i64 i = 0; i < n; i++) total += a[i] * b[i];
    return total;
}

INLINE void cpu_relax(void) {}

INLINE unsigned denormals_off(void) { return 0; }

INLINE void denormals_restore(unsigned csr) { (void)csr; }
