"""GGUF files loaded as they are stored: quantized tensors repacked into herd's packed formats
(no dequantization), 16- and 32-bit tensors memory-mapped.

    Q8_0 -> q8, group 32, fp16 scales      Q4_0 -> q4, group 32, symmetric
    Q4_1 -> q4, group 32, fp16 scales      Q4_K -> q4, group 32, fp32 scales (d * sc, -dmin * m)
    Q6_K -> q8, group 16, fp32 scales      F16, BF16 -> f16, bf16;  F32 -> fp32
Any other type is dequantized to fp32 (gguf-py), so every file llama.cpp writes for a Llama still
loads. The header is read by herd's bounded reader (herd.checkpoint.gguf_file.GGUFFile); the
blocks are repacked by herd.quant.gguf.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from herd.checkpoint.base import Checkpoint
from herd.checkpoint.gguf_file import gguf_extras, open_gguf, to_float
from herd.model import Transformer
from herd.quant.gguf import repack
from herd.quant.linear import PackedEmbedding, PackedLinear


def _module(path: Path, name: str, shape, kind, data) -> nn.Module:
    packed = repack(kind, shape, data) if len(shape) == 2 else None
    if packed is not None:
        fmt, g, tensors = packed
        return PackedLinear(fmt, shape[1], shape[0], g, tensors)
    linear = nn.Linear(shape[1], shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(torch.from_numpy(to_float(path, name, shape, kind, data)), requires_grad=False)
    return linear


def load_gguf_packed(path: str | Path, tokenizer: bool = True) -> tuple[Transformer, Checkpoint]:
    """A model built from a GGUF file with its tensors kept as stored (see the module docstring),
    and the file's Checkpoint (config, tokenizer, chat template, end tokens; its state_dict is the
    model's). Names and shapes are checked against the config before any tensor is read."""
    f, cfg, names = open_gguf(Path(path))
    path = f.path
    with torch.device("meta"):
        model = Transformer(cfg)
    floats = {}
    for gname, (shape, kind, data) in f.tensors.items():
        name = names.get(gname)
        if name is None or name == "tok_embeddings.weight":  # a tied output.weight; the embedding comes last
            continue
        if name.endswith("norm.weight"):
            floats[name] = torch.from_numpy(to_float(path, gname, shape, kind, data))
            continue
        parent, _, attr = name.removesuffix(".weight").rpartition(".")
        setattr(model.get_submodule(parent), attr, _module(path, gname, shape, kind, data))

    embedding = _module(path, "token_embd.weight", *f.tensors["token_embd.weight"])
    if cfg.tie_embeddings:
        model.output = embedding
    if isinstance(embedding, PackedLinear):
        model.tok_embeddings = PackedEmbedding(embedding)
    else:
        floats["tok_embeddings.weight"] = embedding.weight
    model.load_state_dict(floats, strict=False, assign=True)
    if cfg.tie_embeddings and isinstance(model.output, nn.Linear):
        model.output.weight = model.tok_embeddings.weight
    tok, template, eos = gguf_extras(f.metadata, tokenizer)
    return model, Checkpoint(cfg, model.state_dict(), "gguf", path, tok, template, eos)
