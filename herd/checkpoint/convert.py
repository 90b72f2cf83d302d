"""`herd convert`: rewrite a checkpoint of any readable format as a Hugging Face, Meta or GGUF one,
carrying the tokenizer files along; `herd quantize`: as a herd quantized one."""

from __future__ import annotations

from pathlib import Path

import torch

from herd.checkpoint.base import copy_tokenizer_files, tokenizer_file
from herd.checkpoint.gguf_file import read_gguf_metadata
from herd.checkpoint.gguf_writer import TYPES, save_gguf, tokenizer_metadata
from herd.checkpoint.hf import save_hf
from herd.checkpoint.load import build_model, detect_format, load_checkpoint
from herd.checkpoint.meta import save_meta
from herd.checkpoint.packed import save_packed
from herd.errors import HerdError
from herd.quant import quantize


def convert(src: str | Path, dst: str | Path, to: str, dtype: torch.dtype | None = None,
            max_shard_bytes: int = 5 * 2**30, gguf_type: str = "f16") -> Path:
    """Write the checkpoint at `src` to the new directory `dst` in format `to` ("hf" or "meta"),
    optionally cast to `dtype`, or to the GGUF file `dst` ("gguf", matrices in `gguf_type`). The
    tokenizer goes along: its files are copied, or a GGUF's embedded vocabulary is written as
    tokenizer files (tokenizer.json or tokenizer.model, and tokenizer_config.json with the special
    tokens and chat template); a GGUF gets the `tokenizer.*` metadata."""
    if to not in ("hf", "meta", "gguf"):
        raise HerdError(f"cannot convert to {to!r}: the target format must be 'hf', 'meta' or 'gguf'")
    src, dst = Path(src), Path(dst)
    if to == "gguf":
        return _to_gguf(src, dst, gguf_type)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise HerdError(f"{dst}: already exists and is not an empty directory")
    ckpt = load_checkpoint(src, dtype, tokenizer=detect_format(src) == "gguf")
    if to == "hf":
        save_hf(ckpt.config, ckpt.state_dict, dst, eos_ids=ckpt.eos_ids, max_shard_bytes=max_shard_bytes,
                progress=True)
    else:
        save_meta(ckpt.config, ckpt.state_dict, dst, progress=True)

    if ckpt.tokenizer is not None:  # a GGUF's vocabulary; the other formats' tokenizers are files
        ckpt.tokenizer.save(dst)
    else:
        copy_tokenizer_files(ckpt, dst)
    return dst


def quantize_checkpoint(src: str | Path, dst: str | Path, bits: int, group_size: int | None = None,
                        symmetric: bool = False) -> Path:
    """`herd quantize`: read any checkpoint, quantize its weights, write a herd quantized checkpoint."""
    ckpt = load_checkpoint(Path(src), None, tokenizer=False)
    model = build_model(ckpt)
    if ckpt.format == "gguf":
        model.float()  # dequantized GGUF tensors come as fp32 already; norms too
    quantize(model, bits, group_size, symmetric)
    return save_packed(model, ckpt, dst)


def _to_gguf(src: Path, dst: Path, gguf_type: str) -> Path:
    if gguf_type not in TYPES:
        raise HerdError(f"unknown GGUF type {gguf_type!r}; use one of {', '.join(TYPES)}")
    if dst.exists():
        raise HerdError(f"{dst}: already exists")
    ckpt = load_checkpoint(src, None, tokenizer=False)
    if ckpt.format == "gguf":
        vocab = tokenizer_metadata(src, read_gguf_metadata(src))
    elif ckpt.format == "llama2c":
        found = tokenizer_file(src, ckpt.config.vocab_size)
        vocab = tokenizer_metadata(found) if found is not None else {}
    else:
        vocab = tokenizer_metadata(src)
    if ckpt.chat_template and "tokenizer.chat_template" not in vocab:
        vocab["tokenizer.chat_template"] = ckpt.chat_template
    if len(ckpt.eos_ids) == 1 and "tokenizer.ggml.eos_token_id" not in vocab:
        vocab["tokenizer.ggml.eos_token_id"] = next(iter(ckpt.eos_ids))
    return save_gguf(ckpt.config, ckpt.state_dict, dst, gguf_type, tokenizer=vocab, progress=True)
