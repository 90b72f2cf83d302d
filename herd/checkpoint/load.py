"""Recognise a checkpoint by its content, load it, and build a model from it: as stored
(`build_model`) or in the form it runs fastest in (`load_model`, what `herd.load` uses)."""

from __future__ import annotations

from pathlib import Path

import torch

from herd.checkpoint.base import Checkpoint, check_dtype, read_json
from herd.checkpoint.cache import load_gguf_cached
from herd.checkpoint.gguf_file import MAGIC as GGUF_MAGIC
from herd.checkpoint.gguf_file import gguf_tokenizer, load_gguf, open_gguf
from herd.checkpoint.hf import load_hf
from herd.checkpoint.hf_llama4 import load_hf_llama4
from herd.checkpoint.llama2c import is_versioned_export, load_llama2c, read_header
from herd.checkpoint.meta import load_meta
from herd.checkpoint.packed import is_packed_dir, load_packed
from herd.config import ModelConfig
from herd.errors import HerdError
from herd.model.transformer import Transformer
from herd.quant import forward
from herd.quant.quantize import quantize
from herd.tokenizer import Tokenizer, load_tokenizer

SCHEMES = {"int8": 8, "int4": 4}


def _load_hf_dir(path: Path, dtype: torch.dtype | None, tokenizer: bool) -> Checkpoint:
    """An HF directory, in Llama 4's layout or in Llama 1-3's, as its config.json says."""
    hf = read_json(path / "config.json")
    load = load_hf_llama4 if hf.get("model_type") in ("llama4", "llama4_text") else load_hf
    return load(path, hf, dtype, tokenizer)


_LOADERS = {"hf": _load_hf_dir, "meta": load_meta, "llama2c": load_llama2c, "gguf": load_gguf}


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


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
    if _is_gguf(path):
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


def read_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer at `path`: a tokenizer file or a directory holding one (what `load_tokenizer`
    reads), or the vocabulary a GGUF model file embeds."""
    path = Path(path)
    if path.is_file() and _is_gguf(path):
        return gguf_tokenizer(path)
    return load_tokenizer(path)


def read_config(path: str | Path) -> ModelConfig:
    """A checkpoint's config; a GGUF's is read off its header, without dequantizing its tensors."""
    if detect_format(path) == "gguf":
        return open_gguf(Path(path))[1]
    return load_checkpoint(path, tokenizer=False).config


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


def load_model(path: str | Path, dtype: torch.dtype, device: str = "cpu", quantize_to: str | None = None,
               group_size: int | None = None, tokenizer: bool = True) -> tuple[Transformer, Checkpoint]:
    """The model at `path` and its Checkpoint (config, tokenizer, chat template, end tokens).

    quantize_to None (or "keep"): float weights take `dtype`; on the CPU a GGUF's quants stay packed
    and run in the int8/int4 kernels with int8 activations, as llama.cpp runs them (elsewhere they
    are dequantized to `dtype`); herd's quantized checkpoints stay packed. "dequant": a GGUF's quants
    are dequantized to `dtype` (exact against transformers' GGUF loader, 4-8x the memory, slower).
    "int8" / "int4" quantize the weights (a GGUF quant is dequantized first). On the CPU 16-bit
    weights are packed (computed in fp32: torch's CPU bf16 matmul is very slow) and decode steps run
    natively. The Checkpoint's state_dict is left empty on the CPU: the weights are the model's.
    """
    path = Path(path)
    if quantize_to not in (None, "keep", "dequant", *SCHEMES):
        raise HerdError(f"unknown quantization {quantize_to!r}; use int8, int4, keep or dequant")
    cpu = torch.device(device).type == "cpu"
    if is_packed_dir(path):
        if quantize_to not in (None, "keep"):
            raise HerdError(f"{path}: already quantized; load it without a quantization")
        model, ckpt = load_packed(path, tokenizer)
    elif quantize_to in (None, "keep") and cpu and detect_format(path) == "gguf":
        model, ckpt = load_gguf_cached(path, tokenizer)  # a model in the store: its cached packed form
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
