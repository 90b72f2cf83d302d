/* herd_forward: the whole forward pass for a few tokens with a KV cache (decode steps).
 *
 * The same computation as herd.model.Transformer.forward with a cache, for B rows of T tokens,
 * each token at its own position: one call per step instead of dozens of torch operations per
 * layer. Embeddings (any format) and rotary angles come in from torch; logits go out.
 *
 * Thread 0 does the cheap serial work (norms, rope, cache writes, input quantization) while the
 * others wait at the barrier; every thread takes a share of each layer's rows and of the heads.
 */
#include "linear.h"
#include "threads.h"

static void rmsnorm(const float *x, const float *w, i64 M, i64 dim, float eps, float *out) {
    for (i64 i = 0; i < M; i++) {
        const float *v = x + i * dim;
        float r = 1.0f / sqrtf(dot(v, v, dim) / (float)dim + eps);
        for (i64 j = 0; j < dim; j++) out[i * dim + j] = v[j] * r * w[j];
    }
}

/* rotate interleaved pairs of each head of x [M, heads, D] by the token's angles */
static void rope(float *x, i64 M, i64 heads, i64 D, const float *cos, const float *sin) {
    for (i64 i = 0; i < M; i++)
        for (i64 h = 0; h < heads; h++) {
            float *v = x + (i * heads + h) * D;
            const float *c = cos + i * D / 2, *s = sin + i * D / 2;
            for (i64 j = 0; j < D / 2; j++) {
                float a = v[2 * j], b = v[2 * j + 1];
                v[2 * j] = a * c[j] - b * s[j];
                v[2 * j + 1] = a * s[j] + b * c[j];
            }
        }
}

/* softmax(q K^T * scale) V over cache positions 0..p of one head */
static void attend(const float *q, const float *ks, const float *vs, i64 p, i64 D, float scale, float *sc,
                   float *out) {
    float mx = -INFINITY, sum = 0.0f;
    for (i64 j = 0; j <= p; j++) {
        sc[j] = dot(q, ks + j * D, D) * scale;
        mx = sc[j] > mx ? sc[j] : mx;
    }
    for (i64 j = 0; j <= p; j++) {
        sc[j] = expf(sc[j] - mx);
        sum += sc[j];
    }
    for (i64 d = 0; d < D; d++) out[d] = 0.0f;
    for (i64 j = 0; j <= p; j++) {
        float pj = sc[j] / sum;
        const float *vj = vs + j * D;
        for (i64 d = 0; d < D; d++) out[d] += pj * vj[d];
    }
}

/* What the threads of one call share: the activations between the steps of a layer, the input of
   the next linear layers, the attention scores (one row of cache_len per thread), the barrier. */
typedef struct {
    float *xn, *q, *k, *v, *att, *o, *h1, *h3, *scores;
    Input in;
    Barrier bar;
} Work;

static void work_alloc(Work *w, const Step *st) {
    const Model *md = st->model;
    i64 M = st->B * st->T, dim = md->dim, HD = md->n_heads * md->head_dim, KVD = md->n_kv_heads * md->head_dim;
    i64 widest = dim > md->hidden ? dim : md->hidden;
    if (HD > widest) widest = HD;
    w->xn = malloc(M * dim * sizeof(float));
    w->q = malloc(M * HD * sizeof(float));
    w->k = malloc(M * KVD * sizeof(float));
    w->v = malloc(M * KVD * sizeof(float));
    w->att = malloc(M * HD * sizeof(float));
    w->o = malloc(M * dim * sizeof(float));
    w->h1 = malloc(M * md->hidden * sizeof(float));
    w->h3 = malloc(M * md->hidden * sizeof(float));
    w->scores = malloc((size_t)st->threads * st->cache_len * sizeof(float));
    w->in = input_alloc(M, widest);
}

static void work_free(Work *w) {
    input_free(&w->in);
    free(w->xn); free(w->q); free(w->k); free(w->v); free(w->att); free(w->o); free(w->h1); free(w->h3);
    free(w->scores);
}

/* Thread 0: rotate this layer's queries and keys, and write its keys and values into the cache. */
static void rope_and_cache(const Step *st, Work *w, float *kc, float *vc) {
    const Model *md = st->model;
    i64 M = st->B * st->T, KVH = md->n_kv_heads, D = md->head_dim, S = st->cache_len;
    rope(w->q, M, md->n_heads, D, st->cos, st->sin);
    rope(w->k, M, KVH, D, st->cos, st->sin);
    for (i64 i = 0; i < M; i++) {
        i64 row = st->rows[i / st->T], p = st->pos[i];
        for (i64 h = 0; h < KVH; h++) {
            memcpy(kc + ((row * KVH + h) * S + p) * D, w->k + (i * KVH + h) * D, D * sizeof(float));
            memcpy(vc + ((row * KVH + h) * S + p) * D, w->v + (i * KVH + h) * D, D * sizeof(float));
        }
    }
}

/* Thread t of nt's part of layer l's attention: w->o = wo(attention(attn_norm(x))). */
static void attention(const Step *st, i64 l, Work *w, int t, int nt) {
    const Model *md = st->model;
    const Layer *L = md->layers + l;
    i64 M = st->B * st->T, H = md->n_heads, KVH = md->n_kv_heads, D = md->head_dim, S = st->cache_len;
    float *kc = st->k_cache + l * st->cache_rows * KVH * S * D, *vc = st->v_cache + l * st->cache_rows * KVH * S * D;
    float scale = 1.0f / sqrtf((float)D);
    if (t == 0) {
        rmsnorm(st->x, L->attn_norm, M, md->dim, md->eps, w->xn);
        input_set(&w->in, w->xn, M, md->dim);
        input_prepare(&w->in, &L->wq);
        input_prepare(&w->in, &L->wk);
        input_prepare(&w->in, &L->wv);
    }
    barrier_wait(&w->bar, nt);
    linear_share(&L->wq, &w->in, t, nt, w->q);
    linear_share(&L->wk, &w->in, t, nt, w->k);
    linear_share(&L->wv, &w->in, t, nt, w->v);
    barrier_wait(&w->bar, nt);
    if (t == 0) rope_and_cache(st, w, kc, vc);
    barrier_wait(&w->bar, nt);
    for (i64 ih = t; ih < M * H; ih += nt) {
        i64 i = ih / H, kvh = ih % H / (H / KVH), row = st->rows[i / st->T];
        attend(w->q + ih * D, kc + (row * KVH + kvh) * S * D, vc + (row * KVH + kvh) * S * D, st->pos[i], D,
               scale, w->scores + t * S, w->att + ih * D);
    }
    barrier_wait(&w->bar, nt);
    if (t == 0) {
        input_set(&w->in, w->att, M, H * D);
        input_prepare(&w->in, &L->wo);
    }
    barrier_wait(&w->bar, nt);
    linear_share(&L->wo, &w->in, t, nt, w->o);
    barrier_wait(&w->bar, nt);
}

/* Thread t of nt's part of the rest of layer l: x += w->o; x += w2(silu(w1(h)) * w3(h)), h = ffn_norm(x). */
static void feed_forward(const Step *st, i64 l, Work *w, int t, int nt) {
    const Model *md = st->model;
    const Layer *L = md->layers + l;
    i64 M = st->B * st->T, dim = md->dim, hidden = md->hidden;
    if (t == 0) {
        for (i64 j = 0; j < M * dim; j++) st->x[j] += w->o[j];
        rmsnorm(st->x, L->ffn_norm, M, dim, md->eps, w->xn);
        input_set(&w->in, w->xn, M, dim);
        input_prepare(&w->in, &L->w1);
        input_prepare(&w->in, &L->w3);
    }
    barrier_wait(&w->bar, nt);
    linear_share(&L->w1, &w->in, t, nt, w->h1);
    linear_share(&L->w3, &w->in, t, nt, w->h3);
    i64 j0, j1; /* each thread gates the hidden units it computed */
    share(hidden, t, nt, &j0, &j1);
    if (j1 > hidden) j1 = hidden;
    float *h1 = w->h1, *h3 = w->h3;
    for (i64 i = 0; i < M; i++)
        for (i64 j = i * hidden + j0; j < i * hidden + j1; j++) h1[j] = h1[j] / (1.0f + expf(-h1[j])) * h3[j];
    barrier_wait(&w->bar, nt);
    if (t == 0) {
        input_set(&w->in, h1, M, hidden);
        input_prepare(&w->in, &L->w2);
    }
    barrier_wait(&w->bar, nt);
    linear_share(&L->w2, &w->in, t, nt, w->o);
    barrier_wait(&w->bar, nt);
    if (t == 0)
        for (i64 j = 0; j < M * dim; j++) st->x[j] += w->o[j];
}

/* Thread t of nt's part of the logits: output(norm(x)), of one token per row with logits_at. */
static void logits(const Step *st, Work *w, int t, int nt) {
    const Model *md = st->model;
    i64 dim = md->dim, n_out = st->logits_at ? st->B : st->B * st->T;
    if (t == 0) {
        if (st->logits_at) /* keep one token per row */
            for (i64 b = 0; b < st->B; b++)
                memmove(st->x + b * dim, st->x + (b * st->T + st->logits_at[b]) * dim, dim * sizeof(float));
        rmsnorm(st->x, md->norm, n_out, dim, md->eps, w->xn);
        input_set(&w->in, w->xn, n_out, dim);
        input_prepare(&w->in, &md->output);
    }
    barrier_wait(&w->bar, nt);
    linear_share(&md->output, &w->in, t, nt, st->logits);
}

void herd_forward(const Step *st) {
    Work w = {0};
    work_alloc(&w, st);
#pragma omp parallel num_threads(st->threads)
    {
        int t = THREAD_ID, nt = THREAD_COUNT;
        unsigned csr = denormals_off();
        for (i64 l = 0; l < st->model->n_layers; l++) {
            attention(st, l, &w, t, nt);
            feed_forward(st, l, &w, t, nt);
        }
        logits(st, &w, t, nt);
        denormals_restore(csr);
    }
    work_free(&w);
}
