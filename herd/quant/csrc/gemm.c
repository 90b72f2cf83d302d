/* herd_matmul: y = x W^T for many tokens (prefill), as gemm.h describes. */
#include "gemm.h"

#include "linear.h"
#include "threads.h"

/* Bring rows [n, n + PR) of W, inputs [k0, k0 + kc), toward the cache: the next panel's weights,
   fetched while this panel is multiplied (otherwise expand() waits on memory line by line) */
static void prefetch_panel(const Linear *L, i64 n, i64 k0, i64 kc) {
    static const int bits[] = {32, 16, 16};
    i64 b = bits[L->fmt];
    for (int r = 0; r < PR && n + r < L->N; r++) {
        const char *row = (const char *)L->w + ((n + r) * L->K + k0) * b / 8;
        for (i64 off = 0; off < kc * b / 8; off += 64) __builtin_prefetch(row + off, 0, 2);
    }
}

/* y[:, n0:n1] = x W[n0:n1]^T; xp: room for M (rounded up to PT) x KC floats */
static void matmul_rows(const Linear *L, const float *x, i64 M, i64 n0, i64 n1, float *y, float *xp) {
    i64 K = L->K, N = L->N;
    float panel[KC * PR] __attribute__((aligned(32)));
    for (i64 k0 = 0; k0 < K; k0 += KC) {
        i64 kc = K - k0 < KC ? K - k0 : KC;
        /* this slice of x, PT tokens at a time, input-major: one stream for the tile to broadcast from */
        for (i64 m = 0; m < M; m += PT)
            for (i64 k = 0; k < kc; k++)
                for (i64 c = 0; c < PT; c++) xp[m * kc + k * PT + c] = m + c < M ? x[(m + c) * K + k0 + k] : 0.0f;
        for (i64 n = n0; n < n1; n += PR) {
            int R = n1 - n < PR ? (int)(n1 - n) : PR;
            expand(L, n, R, k0, kc, panel);
            prefetch_panel(L, n + PR, k0, kc);
            for (i64 m = 0; m < M; m += PT) {
                const float *xm = xp + m * kc;
                float *ym = y + m * N + n;
                if (k0 > 0) /* the sums the next tile adds to, out of cache since the last slice */
                    for (i64 c = m + PT; c < m + 2 * PT && c < M; c++) PREFETCH(y + c * N + n);
                switch (M - m < PT ? M - m : PT) {
                case 1: micro(panel, kc, xm, 1, R, ym, N, k0 > 0); break;
                case 2: micro(panel, kc, xm, 2, R, ym, N, k0 > 0); break;
                case 3: micro(panel, kc, xm, 3, R, ym, N, k0 > 0); break;
                case 4: micro(panel, kc, xm, 4, R, ym, N, k0 > 0); break;
                case 5: micro(panel, kc, xm, 5, R, ym, N, k0 > 0); break;
                default: micro(panel, kc, xm, 6, R, ym, N, k0 > 0);
                }
            }
        }
    }
}

void herd_matmul(const Linear *L, const float *x, i64 M, float *y, int threads) {
    if (L->fmt >= 3) { /* int8 and int4: int8 activations for any number of tokens (kernels.h) */
        herd_linear(L, x, M, y, threads);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        i64 panels = (L->N + PR - 1) / PR;
        int t = THREAD_ID, nt = THREAD_COUNT;
        i64 n0 = PR * (panels * t / nt), n1 = PR * (panels * (t + 1) / nt);
        float *xp = malloc((M + PT) * KC * sizeof(float));
        matmul_rows(L, x, M, n0, n1 < L->N ? n1 : L->N, y, xp);
        free(xp);
    }
}
