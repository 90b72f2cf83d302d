"""Weight-only quantization of a built Transformer by module swap.

The rounding rules are llama.cpp's reference ones (ggml-quants.c, as gguf-py writes them), applied
to any group size: int8 with group 32 gives exactly GGUF Q8_0, symmetric int4 with group 32 exactly
Q4_0 and asymmetric int4 with group 32 exactly Q4_1, so a model quantized here and the same model
written to GGUF and read back are the same model.
"""

from __future__ import annotations

import torch
from torch import nn

from herd.errors import HerdError
from herd.model import Transformer
from herd.model.transformer import FeedForward
from herd.quant.linear import PackedEmbedding, PackedLinear, kernel_ok, pack_q4

_HALF = {torch.float16: "f16", torch.bfloat16: "bf16"}


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, computed as gguf-py's np_roundf does."""
    a = x.abs()
    floored = a.floor()
    return x.sign() * (floored + (2 * (a - floored)).floor())


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    return w.float().reshape(n, k // group_size, group_size)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def quantize_q8(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """Symmetric int8, one fp16 scale per group of `group_size` inputs: d = max|w| / 127."""
    blocks = _groups(w, group_size)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = _round_half_away(blocks * _inverse(d))
    return {"qweight": q.to(torch.int8).reshape(w.shape), "scales": d.squeeze(-1).half()}


def quantize_q4(w: torch.Tensor, group_size: int, symmetric: bool = False) -> dict[str, torch.Tensor]:
    """4-bit with an fp16 scale per group. Asymmetric: an fp16 offset per group too, the group's range
    [min, max] in 15 steps (Q4_1's rule). Symmetric: d = (the value of largest magnitude) / -8 and
    w = (q - 8) d, no offsets stored (Q4_0's)."""
    blocks = _groups(w, group_size)
    if symmetric:
        extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
        d = extreme / -8
        q = torch.trunc(blocks * _inverse(d) + 8.5).clamp(0, 15).reshape(w.shape)
        return {"qweight": pack_q4(q), "scales": d.half().squeeze(-1)}
    lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    q = torch.trunc((blocks - lo) * _inverse(d) + 0.5).clamp(0, 15).reshape(w.shape)
    return {"qweight": pack_q4(q), "scales": d.half().squeeze(-1), "mins": lo.half().squeeze(-1)}


def pack_weight(weight: torch.Tensor, fmt: str, group_size: int | None = None,
                symmetric: bool = False) -> PackedLinear:
    """A PackedLinear of `weight` [out, in] in format f32/f16/bf16 (the tensor cast, shared when
    already of that dtype) or q8/q4 (quantized; group_size None means one group per row)."""
    n, k = weight.shape
    if fmt in ("f32", "f16", "bf16"):
        dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[fmt]
        return PackedLinear(fmt, k, n, tensors={"weight": weight.detach().to(dtype)})
    g = group_size or k
    if k % g:
        raise HerdError(f"group size {g} does not divide the layer's {k} inputs")
    tensors = quantize_q8(weight, g) if fmt == "q8" else quantize_q4(weight, g, symmetric)
    return PackedLinear(fmt, k, n, g, tensors)


def _targets(model: Transformer) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every linear layer of the transformer blocks, then the output."""
    found = []
    for layer in model.layers:
        found += [(layer.attention, name) for name in ("wq", "wk", "wv", "wo")]
        if isinstance(layer.feed_forward, FeedForward):  # a mixture of experts stays as it is
            found += [(layer.feed_forward, name) for name in ("w1", "w2", "w3")]
    return found + [(model, "output")]


def _float_rest(model: Transformer) -> None:
    """Norm weights (and anything else left as a float parameter) to fp32: packed layers compute in fp32."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.dtype != torch.float32:
                setattr(module, name, nn.Parameter(p.detach().float(), requires_grad=False))


def _group(k: int, fmt: str, group_size: int | None) -> int | None:
    """The group size a layer of k inputs gets (the largest multiple of 32 up to `group_size` that
    divides k; k itself for int8 without a group size), or None when it cannot be packed."""
    if fmt in ("f16", "bf16"):
        return 0
    if group_size is None:
        return k if fmt == "q8" and kernel_ok(fmt, k, k) else None
    g = next((g for g in range(group_size, 0, -32) if k % g == 0), None)
    return g if g is not None and kernel_ok(fmt, k, g) else None


@torch.no_grad()
def quantize(model: Transformer, bits: int, group_size: int | None = None, symmetric: bool = False,
             output_bits: int | None = None) -> Transformer:
    """Replace the model's linear layers (and its embedding) with packed ones, in place.

    bits 8: symmetric int8, one scale per row (group_size None) or per group of inputs.
    bits 4: int4 with a scale and offset per group (default 32); symmetric=True gives Q4_0's rule.
    bits 16: the weights as they are if 16-bit, else bf16 (no rounding beyond the cast).
    output_bits: the output layer's and the embedding's; by default 8 (groups of 32, GGUF's Q8_0)
    when bits is 4, as llama.cpp keeps the output at 6 bits: it is the layer 4 bits hurt most.
    A group size that does not divide a layer's width shrinks (by 32s) until it does; a layer the
    kernels cannot take stays as it is. Returns the model, whose activations are now fp32.
    """
    if bits not in (4, 8, 16):
        raise HerdError(f"bits must be 4, 8 or 16, got {bits!r}")
    if group_size is not None and (not isinstance(group_size, int) or group_size <= 0 or group_size % 32):
        raise HerdError(f"group size must be a positive multiple of 32, got {group_size!r}")
    output_bits = output_bits or (8 if bits == 4 else bits)
    output_group = group_size if output_bits == bits else 32  # GGUF writes it as Q8_0 then
    for parent, name in _targets(model):
        module = getattr(parent, name)
        if isinstance(module, nn.Linear):
            b, g = (output_bits, output_group) if name == "output" else (bits, group_size)
            packed = _pack(module.weight, b, g, symmetric)
            if packed is not None:
                setattr(parent, name, packed)
    if isinstance(model.output, PackedLinear) and isinstance(model.tok_embeddings, nn.Embedding):
        if model.config.tie_embeddings:
            model.tok_embeddings = PackedEmbedding(model.output)
        else:
            packed = _pack(model.tok_embeddings.weight, output_bits, output_group, symmetric)
            if packed is not None:
                model.tok_embeddings = PackedEmbedding(packed)
    _float_rest(model)
    return model


def _pack(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> PackedLinear | None:
    if bits == 16:
        fmt = _HALF.get(weight.dtype, "bf16")
    else:
        fmt = "q8" if bits == 8 else "q4"
        group_size = group_size or (32 if bits == 4 else None)
    g = _group(weight.shape[1], fmt, group_size)
    return None if g is None else pack_weight(weight, fmt, g or None, symmetric)
