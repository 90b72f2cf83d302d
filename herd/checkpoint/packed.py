"""herd's own quantized checkpoints: a directory of `herd.json` (the config, every packed layer's
format and group size, chat template, end tokens), `model.safetensors` (packed tensors in herd's
names) and the tokenizer (the source's tokenizer files, or `gguf_tokenizer.json` holding a GGUF
source's `tokenizer.*` metadata). `herd quantize` writes them (herd.checkpoint.convert).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from herd.checkpoint.base import Checkpoint, check_fits, copy_tokenizer_files, make_config, read_json, with_family
from herd.checkpoint.gguf_file import GGUFFile
from herd.config import ModelConfig
from herd.errors import HerdError
from herd.model import Transformer
from herd.quant.linear import FLOAT_DTYPES, PackedEmbedding, PackedLinear
from herd.tokenizer import load_tokenizer, tokenizer_from_gguf

MANIFEST = "herd.json"
GGUF_TOKENIZER = "gguf_tokenizer.json"


def is_packed_dir(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


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
    if copy_tokenizer_files(ckpt, dst):
        return
    if ckpt.format == "gguf":
        md = {k: v for k, v in GGUFFile(ckpt.path).metadata.items() if k.startswith("tokenizer.")}
        (dst / GGUF_TOKENIZER).write_text(json.dumps(md))


def _packed_shapes(fmt: Any, k: int, n: int, g: Any) -> dict[str, tuple[tuple[int, int], set]] | None:
    """Name -> (shape, dtypes) of each tensor of an n x k layer packed as `fmt` in groups of `g`
    (q4's mins optional; the scales and mins share a dtype); None for a format or group that cannot be."""
    if fmt in FLOAT_DTYPES:
        return {"weight": ((n, k), {FLOAT_DTYPES[fmt]})}
    if isinstance(g, bool) or not isinstance(g, int) or g <= 0 or k % g:
        return None
    scales = ((n, k // g), {torch.float16, torch.float32})
    if fmt == "q8":
        return {"qweight": ((n, k), {torch.int8}), "scales": scales}
    if fmt == "q4" and k % 64 == 0:
        return {"qweight": ((n, k // 2), {torch.uint8}), "scales": scales, "mins": scales}
    return None


def _packed_layer(path: Path, name: str, spec: Any, k: int, n: int, tensors: dict[str, torch.Tensor]) -> PackedLinear:
    """A packed layer of a herd checkpoint, its tensors checked against what its format needs:
    the C kernels read them by pointer, trusting their shapes."""
    fmt, g = (spec.get("format"), spec.get("group_size")) if isinstance(spec, dict) else (None, None)
    expected = _packed_shapes(fmt, k, n, g)
    if expected is None:
        raise HerdError(f"{path}: layer {name} has format {fmt!r} with group size {g!r}, which a {n} x {k} "
                        "layer cannot have")
    missing = expected.keys() - tensors.keys() - {"mins"}
    wrong = [t for t, v in tensors.items() if t not in expected or tuple(v.shape) != expected[t][0]
             or v.dtype not in expected[t][1] or (t == "mins" and v.dtype != tensors.get("scales", v).dtype)]
    if missing or wrong:
        raise HerdError(f"{path}: layer {name} ({fmt}, {n} x {k}) lacks {sorted(missing)} or has wrong tensors "
                        f"{sorted(wrong)}")
    return PackedLinear(fmt, k, n, g, tensors)


def _take(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove and return the tensors named `prefix`.NAME, keyed by NAME."""
    return {k.rsplit(".", 1)[1]: tensors.pop(k) for k in list(tensors) if k.rsplit(".", 1)[0] == prefix}


def _read_packed(path: Path) -> tuple[dict, ModelConfig, dict, Any, dict[str, torch.Tensor]]:
    """(manifest, config, packed layers, packed embedding, tensors) of a herd quantized checkpoint."""
    manifest = read_json(path / MANIFEST)
    try:
        cfg = with_family(make_config(path / MANIFEST, **manifest["config"]))
        layers, embedding = dict(manifest["layers"]), manifest.get("embedding")
        tensors = load_file(str(path / "model.safetensors"))
    except (KeyError, TypeError, ValueError, SafetensorError, OSError) as e:
        raise HerdError(f"{path}: not a valid herd quantized checkpoint ({type(e).__name__}: {e})") from None
    if not all(name.isprintable() for name in tensors):
        raise HerdError(f"{path}: a tensor name in model.safetensors is not printable text")
    # int4 holds two weights a byte: no checkpoint holds more
    check_fits(path, cfg, len(tensors), 2 * sum(t.numel() * t.element_size() for t in tensors.values()))
    return manifest, cfg, layers, embedding, tensors


def load_packed(path: Path, tokenizer: bool = True) -> tuple[Transformer, Checkpoint]:
    manifest, cfg, layers, embedding, tensors = _read_packed(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, spec in layers.items():
        if name not in linears:
            raise HerdError(f"{path}: {MANIFEST} names a packed layer {name!r} the model does not have")
        parent, attr = name.rsplit(".", 1) if "." in name else ("", name)
        meta = model.get_submodule(name)
        setattr(model.get_submodule(parent), attr,
                _packed_layer(path, name, spec, meta.in_features, meta.out_features, _take(tensors, name)))
    if embedding is not None:
        if cfg.tie_embeddings:
            if not isinstance(model.output, PackedLinear):
                raise HerdError(f"{path}: a tied packed embedding needs a packed output layer")
            model.tok_embeddings = PackedEmbedding(model.output)
        else:
            packed = _packed_layer(path, "tok_embeddings", embedding, cfg.dim, cfg.vocab_size,
                                   _take(tensors, "tok_embeddings"))
            model.tok_embeddings = PackedEmbedding(packed)
    floats = [name for name, t in tensors.items() if not t.is_floating_point()]
    if floats:
        raise HerdError(f"{path}: tensor {floats[0]} is not floating point")
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
        tok = tokenizer_from_gguf(read_json(path / GGUF_TOKENIZER))
    elif tokenizer and ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        tok = load_tokenizer(path)
    template = manifest.get("chat_template")
    ckpt = Checkpoint(cfg, model.state_dict(), "herd", path, tok, template if isinstance(template, str) else None,
                      {i for i in manifest.get("eos_ids") or () if isinstance(i, int)})
    return model, ckpt
