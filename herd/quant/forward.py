"""The native decode step: `Transformer.forward` for a few tokens with a KV cache, run as one C call
(`herd_forward` in csrc/forward.c) instead of ~40 torch operations per layer.

A decode step of a small model is mostly Python and dispatch overhead (about 0.3 ms per layer
here), which at 22 layers is as long as streaming the weights of an int4 1B model. Installed on a
model by `enable(model)`, it takes over whenever it can (CPU, fp32 KV cache, no autograd, one
token per row or at most MAX_TOKENS tokens in all (any number when every linear layer is int8 or
int4: whole prompts), every linear layer in a kernel format) and
otherwise lets the torch forward run. It writes a plain KVCache or the serving engine's slots.
Every token is computed the same way whatever else is in the call, so a batch row's, or a
speculative draft's, logits do not depend on its neighbours.
"""

from __future__ import annotations

import ctypes
import gc
import mmap

import torch
from torch import nn

from herd.model import KVCache, SlotCache, SlotRows, Transformer
from herd.quant import native
from herd.quant.linear import PackedLinear

MAX_TOKENS = 16  # in a call with several tokens per row; any number when every linear layer is int8/int4


def _linear(parent: nn.Module, name: str, records: list) -> native.Linear | None:
    """The kernel description of the linear layer parent.name, or None if the kernels cannot take it.
    Appends (dict, key, object) records whose identity says the description is still valid."""
    module = parent._modules[name]
    records.append((parent._modules, name, module))
    if isinstance(module, PackedLinear) and module.kernel_ok:
        records += [(module._buffers, k, v) for k, v in module.packed().items()]
        return module.describe()
    if type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.in_features % 16 == 0:
        records.append((module._parameters, "weight", module.weight))
        return native.Linear(0, 0, 0, module.out_features, module.in_features, module.weight.data_ptr(), None, None)
    return None


def _norm(module: nn.Module, records: list) -> int | None:
    w = module.weight
    records.append((module._parameters, "weight", w))
    return w.data_ptr() if w.dtype == torch.float32 else None


def _describe(model: Transformer) -> tuple[native.Model, object, list] | None:
    """The model for C (plus what must stay alive with it and the validity records), or None."""
    cfg, records = model.config, [(model._modules, "layers", model.layers)]
    if cfg.moe or cfg.nope_layer_step or cfg.attention_chunk_size or cfg.qk_norm or cfg.attn_temperature:
        return None  # Llama 4's layers: the torch forward
    layers = (native.Layer * cfg.n_layers)()
    for i, block in enumerate(model.layers):
        records.append((model.layers._modules, str(i), block))
        for parent, names in ((block.attention, ("wq", "wk", "wv", "wo")), (block.feed_forward, ("w1", "w2", "w3"))):
            records.append((block._modules, "attention" if parent is block.attention else "feed_forward", parent))
            for name in names:
                desc = _linear(parent, name, records)
                if desc is None:
                    return None
                setattr(layers[i], name, desc)
        norms = [_norm(block.attention_norm, records), _norm(block.ffn_norm, records)]
        if None in norms:
            return None
        layers[i].attn_norm, layers[i].ffn_norm = norms
    out, norm = _linear(model, "output", records), _norm(model.norm, records)
    if out is None or norm is None:
        return None
    tensors = [o for _, _, o in records if isinstance(o, torch.Tensor)]
    if not all(t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return None
    desc = native.Model(cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps,
                        ctypes.addressof(layers), norm, out)
    return desc, layers, records


class NativeForward:
    """Callable installed as `model.fast_forward`; returns None when the torch forward must run."""

    def __init__(self):
        self._described = None  # (model description, its layers array, validity records), or False

    def __deepcopy__(self, memo):
        return NativeForward()

    def description(self, model: Transformer) -> native.Model | None:
        """The model's description for C, rebuilt whenever a layer or weight has been replaced."""
        d = self._described
        if d is None or (d and not all(where.get(key) is obj for where, key, obj in d[2])):
            d = self._described = _describe(model) or False
        return d[0] if d else None

    def token_limit(self) -> int | None:
        """The most tokens a call with several per row may have (None: any). A model whose linear
        layers are all int8/int4 runs any prompt natively: its linear layers compute each token
        alike whatever the call (kernels.h), and so then does the whole step, so that a prompt's
        tokens, a batch's rows and a speculative draft's verification give a decode step's numbers."""
        layers = self._described[1] if self._described else ()
        linears = [getattr(layer, n) for layer in layers for n in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")]
        return None if linears and all(lin.fmt >= native.FORMAT_CODES["q8"] for lin in linears) else MAX_TOKENS

    def __call__(self, model: Transformer, tokens: torch.Tensor, input_pos: torch.Tensor | None,
                 cache, logits_at: torch.Tensor | None) -> torch.Tensor | None:
        B, T = tokens.shape
        target = _cache_rows(cache, B)
        if target is None or tokens.device.type != "cpu" or torch.is_grad_enabled():
            return None
        store, rows, n = target
        if store.k.dtype != torch.float32 or not store.k.is_contiguous():
            return None
        lib = native.library()
        desc = self.description(model) if lib is not None else None
        limit = self.token_limit()
        if desc is None or (T > 1 and limit is not None and B * T > limit):
            return None
        if input_pos is None:
            input_pos = torch.arange(T)
        pos = input_pos.expand(B, T)[:n].contiguous().to(torch.int64)
        if int(pos.max()) >= store.max_seq_len or int(pos.min()) < 0 or int(rows.max()) >= store.batch_size:
            return None  # the torch forward raises the error
        angles = pos.unsqueeze(-1).float() * model.inv_freq
        cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
        x = model.tok_embeddings(tokens[:n]).float().contiguous()
        at = None if logits_at is None else logits_at[:n].to(torch.int64).contiguous()
        logits = torch.empty(n, 1 if at is not None else T, model.config.vocab_size)
        step = native.Step(ctypes.addressof(desc), n, T, x.data_ptr(), pos.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                     rows.data_ptr(), store.k.data_ptr(), store.v.data_ptr(), store.batch_size, store.max_seq_len,
                     at.data_ptr() if at is not None else None, logits.data_ptr(), native.threads())
        lib.herd_forward(ctypes.byref(step))
        return logits if n == B else torch.cat([logits, logits[-1:].expand(B - n, -1, -1)])


def _cache_rows(cache, B: int) -> tuple[KVCache, torch.Tensor, int] | None:
    """(the KV cache, the cache row of each batch row, how many rows to compute) when the native
    step can write the cache itself: a plain KVCache, or the serving engine's view of its slots,
    whose padding rows (copies of its last real row) are not computed. None for a cache that
    attends its own way."""
    if type(cache) is KVCache:
        return cache, torch.arange(B, dtype=torch.int64), B
    if type(cache) is SlotRows and type(cache.cache) is SlotCache:
        return cache.cache, cache.index.to(torch.int64).contiguous(), cache.n_real
    return None


def enable(model: Transformer) -> Transformer:
    """Let `model` run its decode steps natively where it can (see the module docstring).

    Also moves every object alive now (the model's modules and tensors among them) out of reach of
    Python's cyclic garbage collector (`gc.freeze`): each step allocates a few objects, which
    triggers collections that would otherwise walk the whole model (6% of a 1B int4 decode step);
    moves the weights into 2 MB pages (`_weights_in_huge_pages`); and keeps freed memory in the
    process (`_keep_freed_memory`).
    """
    model.fast_forward = NativeForward()
    _weights_in_huge_pages(model)
    gc.freeze()
    _keep_freed_memory()
    return model


def _keep_freed_memory() -> None:
    """Have glibc's malloc keep memory it is given back instead of returning it to the system.

    A prefill's activations are megabytes each; by default glibc maps each afresh and unmaps it when
    freed, so every layer's tensors come back as new pages that the kernel zeroes one page fault at
    a time (TinyLlama f16 prefill of 128 tokens: 13% faster without). Blocks under 32 MB now come
    from the heap, which is never trimmed: the process keeps its peak heap, as an inference server
    does anyway. A no-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_trim_threshold, 2**31 - 1)
    mallopt(m_mmap_threshold, 32 << 20)


_HUGE = 2 << 20


def _weights_in_huge_pages(model: nn.Module) -> None:
    """Copy the model's CPU tensors into one block of memory backed by transparent huge pages (2 MB),
    in the order the forward pass reads them, each tensor keeping a storage of its own.

    A decode step streams every weight once. In 4 KB pages that is a TLB miss, and in a virtual
    machine a nested page walk, every 4 KB; in 2 MB pages decoding runs faster (2 Zen 3 cores in a
    VM, decode tok/s: stories110M fp32 +5 to +17%, TinyLlama f16 +10-17%, int4 +4%, each against
    the same model in 4 KB pages in one process). Linux only: elsewhere nothing moves. Each old tensor is freed as soon as it is copied,
    so the peak memory is the model's plus one tensor, if nothing else holds the old tensors.
    Tensors shared between modules (tied embeddings) stay shared."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    offsets = {}  # (address, dtype, shape) -> offset in the block
    places = []  # (dict, key, ident): no tensors, so that each old tensor is freed once moved
    end = 0
    for module in model.modules():
        for where in (module._parameters, module._buffers):
            for key, t in where.items():
                if t is None or t.device.type != "cpu" or not t.is_contiguous():
                    continue
                ident = (t.data_ptr(), t.dtype, tuple(t.shape))
                if ident not in offsets:
                    offsets[ident] = end
                    end += -(-t.numel() * t.element_size() // 64) * 64
                places.append((where, key, ident))
    if advice is None or end < _HUGE:
        return
    block = mmap.mmap(-1, end + _HUGE, flags=mmap.MAP_PRIVATE)
    start = -torch.frombuffer(block, dtype=torch.uint8, count=1).data_ptr() % _HUGE
    block.madvise(advice, start, end)
    moved = {}
    for where, key, ident in places:
        if ident not in moved:
            t, (_, dtype, shape) = where[key], ident
            nbytes = t.numel() * t.element_size()
            raw = torch.frombuffer(block, dtype=torch.uint8, count=nbytes, offset=start + offsets[ident]) if nbytes \
                else torch.empty(0, dtype=torch.uint8)
            new = raw.view(dtype).view(shape).copy_(t.detach())
            moved[ident] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
            del t
        where[key] = moved[ident]
