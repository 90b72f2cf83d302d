/* A linear layer for a few tokens (decode): its rows in tiles of two, its tokens in groups of MAXC,
 * each thread taking a share of the rows. herd_linear is one layer; herd_forward (forward.c) runs
 * every layer of the model this way. */
#include "linear.h"

#include "threads.h"
#include "tiles.h"

/* Run TILE(R, C, n, m0) over rows [n0, n1) (in pairs; n0 even) and all tokens (in groups of MAXC).
   R and C are compile-time constants in every expansion. */
#define TILE_ROWS(TILE, R, C, n, m0)                                                                  \
    switch (C) {                                                                                      \
    case 1: TILE(R, 1, n, m0); break;                                                                 \
    case 2: TILE(R, 2, n, m0); break;                                                                 \
    case 3: TILE(R, 3, n, m0); break;                                                                 \
    case 4: TILE(R, 4, n, m0);                                                                        \
    }
#define TILES(n0, n1, N, M, TILE)                                                                     \
    for (i64 n = n0; n < n1; n += 2) {                                                                \
        for (i64 m0 = 0; m0 < M; m0 += MAXC) {                                                        \
            int C = M - m0 < MAXC ? (int)(M - m0) : MAXC;                                             \
            if (n + 1 < N) {                                                                          \
                TILE_ROWS(TILE, 2, C, n, m0)                                                          \
            } else {                                                                                  \
                TILE_ROWS(TILE, 1, C, n, m0)                                                          \
            }                                                                                         \
        }                                                                                             \
    }

#define SCALES(p, n) ((const char *)(p) + (n) * (K / L->g) * (L->s16 ? 2 : 4))
#define F32_TILE(R, C, n, m0)                                                                         \
    for (int r = 0; r < R; r++)                                                                       \
        tile_f32((const float *)L->w + (n + r) * K, K, 1, x + m0 * K, C, y + m0 * N + n + r, N)
#define F16_TILE(R, C, n, m0) tile_f16((const uint16_t *)L->w + n * K, K, R, x + m0 * K, C, y + m0 * N + n, N)
#define BF16_TILE(R, C, n, m0) tile_bf16((const uint16_t *)L->w + n * K, K, R, x + m0 * K, C, y + m0 * N + n, N)
#define Q8_TILE(R, C, n, m0)                                                                          \
    tile_q8((const int8_t *)L->w + n * K, SCALES(L->s, n), L->s16, L->g, K, R, in->xq + m0 * K,       \
            in->xd + m0 * (K / 32), C, y + m0 * N + n, N, L->g == 16)
#define Q4_TILE(R, C, n, m0)                                                                          \
    tile_q4((const uint8_t *)L->w + n * K / 2, SCALES(L->s, n), L->m ? SCALES(L->m, n) : NULL, L->s16, \
            L->g, K, R, in->xq + m0 * K, in->xd + m0 * (K / 32), in->xg + m0 * (K / L->g), C,          \
            y + m0 * N + n, N)

/* y[:, n0:n1] = x W[n0:n1]^T for a prepared input (n0 even). Every (row, token) dot product is
   computed the same way whatever the range, so splitting rows between threads changes nothing. */
static void linear_rows(const Linear *L, const Input *in, i64 n0, i64 n1, float *y) {
    i64 M = in->M, K = L->K, N = L->N;
    const float *x = in->x;
    switch (L->fmt) {
    case 0: TILES(n0, n1, N, M, F32_TILE) break;
    case 1: TILES(n0, n1, N, M, F16_TILE) break;
    case 2: TILES(n0, n1, N, M, BF16_TILE) break;
    case 3: TILES(n0, n1, N, M, Q8_TILE) break;
    default: TILES(n0, n1, N, M, Q4_TILE)
    }
}

void share(i64 N, int t, int nt, i64 *n0, i64 *n1) {
    i64 pairs = (N + 1) / 2;
    *n0 = 2 * (pairs * t / nt);
    *n1 = 2 * (pairs * (t + 1) / nt);
}

void linear_share(const Linear *L, const Input *in, int t, int nt, float *y) {
    i64 n0, n1;
    share(L->N, t, nt, &n0, &n1);
    linear_rows(L, in, n0, n1, y);
}

void herd_linear(const Linear *L, const float *x, i64 M, float *y, int threads) {
    Input in = input_alloc(M, L->K);
    input_set(&in, x, M, L->K);
    input_prepare(&in, L);
#pragma omp parallel num_threads(threads)
    linear_share(L, &in, THREAD_ID, THREAD_COUNT, y);
    input_free(&in);
}
