"""Loading a model in the form it runs fastest in, and herd's own quantized checkpoints.

A quantized checkpoint is a directory: `herd.json` (the config, every packed layer's format and
group size, chat template, end tokens), `model.safetensors` (packed tensors in herd's names) and the
tokenizer (the source's tokenizer files, or `gguf_tokenizer.json` holding a GGUF source's
`tokenizer.*` metadata).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from herd.checkpoint import Checkpoint, build_model, detect_format, load_checkpoint
from herd.checkpoint.base import read_json, with_family
from herd.config import ModelConfig
from herd.errors import HerdError
from herd.model import Transformer
from herd.quant import forward
from herd.quant.linear import PackedEmbedding, PackedLinear
from herd.quant.quantize import quantize

MANIFEST = "herd.json"
GGUF_TOKENIZER = "gguf_tokenizer.json"
SCHEMES = {"int8": 8, "int4": 4}


def is_packed_dir(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def load_model(path: str | Path, dtype: torch.dtype, device: str = "cpu", quantize_to: str | None = None,
               group_size: int | None = None, tokenizer: bool = True) -> tuple[Transformer, Checkpoint]:
    """The model at `path` and its Checkpoint (config, tokenizer, chat template, end tokens).

    quantize_to None: float weights take `dtype`, GGUF quants are dequantized to it, herd's quantized
    checkpoints stay packed. "keep": GGUF quants stay packed too (on the CPU; faster, but the
    kernels' int8 activations change some greedy outputs). "int8" / "int4" quantize the weights
    (a GGUF quant is dequantized first). On the CPU 16-bit weights
    are packed (computed in fp32: torch's CPU bf16 matmul is very slow) and decode steps run natively.
    The Checkpoint's state_dict is left empty on the CPU: the weights are the model's.
    """
    path = Path(path)
    if quantize_to not in (None, "keep", *SCHEMES):
        raise HerdError(f"unknown quantization {quantize_to!r}; use int8, int4 or keep")
    cpu = torch.device(device).type == "cpu"
    if is_packed_dir(path):
        if quantize_to not in (None, "keep"):
            raise HerdError(f"{path}: already quantized; load it without a quantization")
        model, ckpt = load_packed(path, tokenizer)
    elif quantize_to == "keep" and cpu and detect_format(path) == "gguf":
        from herd.quant.gguf import load_gguf_packed

        model, ckpt = load_gguf_packed(path, tokenizer)
    else:
        ckpt = load_checkpoint(path, dtype, tokenizer)
        model = build_model(ckpt, device)
        if quantize_to in SCHEMES:
            quantize(model, SCHEMES[quantize_to], group_size)
        elif cpu and dtype in (torch.float16, torch.bfloat16):
            quantize(model, 16)
    if cpu:
        ckpt.state_dict = {}  # the model holds the weights: each can be freed once enable() has moved it
        forward.enable(model)
    return model.to(device).eval(), ckpt


def _packed_layers(model: Transformer) -> dict[str, dict[str, Any]]:
    return {name: {"format": m.fmt, "group_size": m.group_size}
            for name, m in model.named_modules() if isinstance(m, PackedLinear)}


def save_packed(model: Transformer, ckpt: Checkpoint, dst: str | Path) -> Path:
    """Write a packed model as a herd quantized checkpoint in the new directory `dst`, with the
    tokenizer of the checkpoint it came from."""
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise HerdError(f"{dst}: already exists and is not an empty directory")
    dst.mkdir(parents=True, exist_ok=True)
    tied, packed_embedding = model.config.tie_embeddings, isinstance(model.tok_embeddings, PackedEmbedding)
    tensors = {}
    for name, t in model.state_dict().items():
        if tied and (name.startswith("tok_embeddings.") if packed_embedding else name == "output.weight"):
            continue  # one copy of the shared matrix
        tensors[name] = t.contiguous()
    save_file(tensors, str(dst / "model.safetensors"))
    embedding = model.tok_embeddings
    manifest = {
        "config": model.config.to_dict(),
        "layers": _packed_layers(model),
        "embedding": {"format": embedding.fmt, "group_size": embedding.group_size}
        if isinstance(embedding, PackedEmbedding) else None,
        "chat_template": ckpt.chat_template,
        "eos_ids": sorted(ckpt.eos_ids),
    }
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _copy_tokenizer(ckpt, dst)
    return dst


def _copy_tokenizer(ckpt: Checkpoint, dst: Path) -> None:
    from herd.checkpoint.convert import copy_tokenizer_files

    if copy_tokenizer_files(ckpt, dst):
        return
    if ckpt.format == "gguf":
        from herd.quant.gguf import GGUFFile

        md = {k: v for k, v in GGUFFile(ckpt.path).metadata.items() if k.startswith("tokenizer.")}
        (dst / GGUF_TOKENIZER).write_text(json.dumps(md))


def load_packed(path: Path, tokenizer: bool = True) -> tuple[Transformer, Checkpoint]:
    manifest = read_json(path / MANIFEST)
    try:
        cfg = with_family(ModelConfig(**manifest["config"]))
        layers, embedding = manifest["layers"], manifest.get("embedding")
        tensors = load_file(str(path / "model.safetensors"))
    except (KeyError, TypeError, SafetensorError, OSError) as e:
        raise HerdError(f"{path}: not a valid herd quantized checkpoint ({type(e).__name__}: {e})") from None
    with torch.device("meta"):
        model = Transformer(cfg)
    for name, spec in layers.items():
        parent, attr = name.rsplit(".", 1) if "." in name else ("", name)
        meta = model.get_submodule(name)
        packed = {k.rsplit(".", 1)[1]: tensors.pop(k) for k in list(tensors) if k.rsplit(".", 1)[0] == name}
        setattr(model.get_submodule(parent), attr,
                PackedLinear(spec["format"], meta.in_features, meta.out_features, spec["group_size"], packed))
    if embedding is not None:
        if cfg.tie_embeddings:
            model.tok_embeddings = PackedEmbedding(model.output)
        else:
            packed = {k.rsplit(".", 1)[1]: tensors.pop(k) for k in list(tensors) if k.startswith("tok_embeddings.")}
            model.tok_embeddings = PackedEmbedding(PackedLinear(embedding["format"], cfg.dim, cfg.vocab_size,
                                                                embedding["group_size"], packed))
    try:
        model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as e:
        raise HerdError(f"{path}: tensors do not fit the config ({e})") from None
    if cfg.tie_embeddings and isinstance(model.output, nn.Linear):
        model.output.weight = model.tok_embeddings.weight
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise HerdError(f"{path}: tensor {missing[0]} is missing")
    tok = None
    if tokenizer and (path / GGUF_TOKENIZER).is_file():
        from herd.tokenizer import tokenizer_from_gguf

        tok = tokenizer_from_gguf(read_json(path / GGUF_TOKENIZER))
    elif tokenizer and ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        from herd.tokenizer import load_tokenizer

        tok = load_tokenizer(path)
    ckpt = Checkpoint(cfg, model.state_dict(), "herd", path, tok, manifest.get("chat_template"),
                      set(manifest.get("eos_ids") or ()))
    return model, ckpt


def quantize_checkpoint(src: str | Path, dst: str | Path, bits: int, group_size: int | None = None,
                        symmetric: bool = False) -> Path:
    """`herd quantize`: read any checkpoint, quantize its weights, write a herd quantized checkpoint."""
    ckpt = load_checkpoint(Path(src), None, tokenizer=False)
    model = build_model(ckpt)
    if ckpt.format == "gguf":
        model.float()  # dequantized GGUF tensors come as fp32 already; norms too
    quantize(model, bits, group_size, symmetric)
    return save_packed(model, ckpt, dst)
