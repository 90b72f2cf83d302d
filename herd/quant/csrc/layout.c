/* The layout of the structs shared with Python (kernels.h), which native.py checks against its
 * ctypes Structures when it loads the library. */
#include <stddef.h>

#include "kernels.h"

#define STRUCT(T) {#T, NULL, 0, sizeof(T)}
#define FIELD(T, f) {#T, #f, offsetof(T, f), sizeof(((T *)0)->f)}

static const LayoutLine layout[] = {
    STRUCT(Linear), FIELD(Linear, fmt), FIELD(Linear, s16), FIELD(Linear, g), FIELD(Linear, N), FIELD(Linear, K),
    FIELD(Linear, w), FIELD(Linear, s), FIELD(Linear, m),
    STRUCT(Layer), FIELD(Layer, attn_norm), FIELD(Layer, ffn_norm), FIELD(Layer, wq), FIELD(Layer, wk),
    FIELD(Layer, wv), FIELD(Layer, wo), FIELD(Layer, w1), FIELD(Layer, w2), FIELD(Layer, w3),
    STRUCT(Model), FIELD(Model, dim), FIELD(Model, hidden), FIELD(Model, n_layers), FIELD(Model, n_heads),
    FIELD(Model, n_kv_heads), FIELD(Model, head_dim), FIELD(Model, eps), FIELD(Model, layers), FIELD(Model, norm),
    FIELD(Model, output),
    STRUCT(Step), FIELD(Step, model), FIELD(Step, B), FIELD(Step, T), FIELD(Step, x), FIELD(Step, pos),
    FIELD(Step, cos), FIELD(Step, sin), FIELD(Step, rows), FIELD(Step, k_cache), FIELD(Step, v_cache),
    FIELD(Step, cache_rows), FIELD(Step, cache_len), FIELD(Step, logits_at), FIELD(Step, logits),
    FIELD(Step, threads),
    {NULL, NULL, 0, 0},
};

const LayoutLine *herd_layout(void) { return layout; }
