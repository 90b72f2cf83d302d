/* The plain C half of activations.c. */
#pragma once

/* q[0..32) = v[0..32) / d rounded half to even, d = max |v| / 127 (0 for a block of zeros); returns
   the sum of q. */
INLINE int quantize_block(const float *v, int8_t *q, float *d) {
    float amax = 0.0f;
    for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(v[j]));
    *d = amax / 127.0f;
    float id = *d ? 1.0f / *d : 0.0f;
    int sum = 0;
    for (int j = 0; j < 32; j++) {
        int qj = (int)nearbyintf(v[j] * id);
        q[j] = (int8_t)qj;
        sum += qj;
    }
    return sum;
}
