"""Recognise a checkpoint by its content, load it, and build a model from it."""

from __future__ import annotations

from pathlib import Path

import torch

from herd.checkpoint.base import Checkpoint, check_dtype
from herd.checkpoint.gguf_file import MAGIC as GGUF_MAGIC
from herd.checkpoint.gguf_file import load_gguf
from herd.checkpoint.hf import load_hf
from herd.checkpoint.llama2c import is_versioned_export, load_llama2c, read_header
from herd.checkpoint.meta import load_meta
from herd.errors import HerdError
from herd.model.transformer import Transformer

_LOADERS = {"hf": load_hf, "meta": load_meta, "llama2c": load_llama2c, "gguf": load_gguf}


def detect_format(path: str | Path) -> str:
    """Which format `path` holds: "hf", "meta", "gguf" or "llama2c", judged from the content
    (magic bytes, a plausible llama2.c header, the files a directory holds), not the name alone."""
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            return "hf"
        if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
            return "meta"
        raise HerdError(f"{path}: not a checkpoint directory (expected config.json with *.safetensors, "
                        "or params.json with consolidated.*.pth)")
    if not path.is_file():
        raise HerdError(f"{path}: no such file or directory")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == GGUF_MAGIC:
        return "gguf"
    if path.suffix == ".bin":
        if is_versioned_export(path):
            raise HerdError(f"{path}: a llama2.c export of version 1 or later; only the legacy version 0 "
                            "format is supported (export.py --version 0)")
        if read_header(path) is not None:
            return "llama2c"
    raise HerdError(f"{path}: unknown checkpoint format (expected a GGUF file, a llama2.c .bin, "
                    "or a Hugging Face or Meta directory)")


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = None, tokenizer: bool = True) -> Checkpoint:
    """Read a checkpoint of any supported format.

    dtype: cast every tensor to it as it is read (None keeps the stored dtype; GGUF gives float32).
    tokenizer: also build the tokenizer found beside the weights or embedded in them; False
        skips that (conversion copies tokenizer files instead of parsing them).
    """
    check_dtype(dtype)
    path = Path(path)
    return _LOADERS[detect_format(path)](path, dtype, tokenizer)


def build_model(ckpt: Checkpoint, device: torch.device | str = "cpu") -> Transformer:
    """A Transformer that uses the checkpoint's tensors themselves: built on the meta device and
    given the tensors with assign=True, so weights are never allocated twice."""
    cfg = ckpt.config
    with torch.device("meta"):
        model = Transformer(cfg)
    state_dict = dict(ckpt.state_dict)
    if cfg.tie_embeddings:
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
    model.load_state_dict(state_dict, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.to(device)
