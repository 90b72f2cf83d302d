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
