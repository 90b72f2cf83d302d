/* The plain C half of activations.c. */
#pragma once

/* One block of 32 as llama.cpp's quantize_row_q8_0 / quantize_row_q8_1 compute it on x86:
   q = v * (127 / max |v|) rounded half to even (0 for a block of zeros); *d = max |v| / 127 and
   *s = that d times the sum of q, each rounded to fp16 (Q8_0's d, Q8_1's d and s). */
INLINE void quantize_block(const float *v, int8_t *q, float *d, float *s) {
    float amax = 0.0f;
    for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(v[j]));
    float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    int sum = 0;
    for (int j = 0; j < 32; j++) {
        int qj = (int)nearbyintf(v[j] * id);
        q[j] = (int8_t)qj;
        sum += qj;
    }
    *d = fp16_round(amax / 127.0f);
    *s = fp16_round(amax / 127.0f * (float)sum);
}
