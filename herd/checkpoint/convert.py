"""`herd convert`: rewrite a checkpoint of any readable format as a Hugging Face or Meta one,
carrying the tokenizer files along."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from herd.checkpoint.hf import save_hf
from herd.checkpoint.llama2c import tokenizer_file
from herd.checkpoint.load import load_checkpoint
from herd.checkpoint.meta import save_meta
from herd.errors import HerdError

# Files beside HF / Meta weights that describe the tokenizer, chat template and stop tokens.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


def convert(src: str | Path, dst: str | Path, to: str, dtype: torch.dtype | None = None,
            max_shard_bytes: int = 5 * 2**30, gguf_type: str = "f16") -> Path:
    """Write the checkpoint at `src` to the new directory `dst` in format `to` ("hf" or "meta"),
    optionally cast to `dtype`, or to the GGUF file `dst` ("gguf", matrices in `gguf_type`, with
    the vocabulary). A GGUF's embedded vocabulary is not exported to hf or meta."""
    if to not in ("hf", "meta", "gguf"):
        raise HerdError(f"cannot convert to {to!r}: the target format must be 'hf', 'meta' or 'gguf'")
    src, dst = Path(src), Path(dst)
    if to == "gguf":
        return _to_gguf(src, dst, gguf_type)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise HerdError(f"{dst}: already exists and is not an empty directory")
    ckpt = load_checkpoint(src, dtype, tokenizer=False)
    if to == "hf":
        save_hf(ckpt.config, ckpt.state_dict, dst, eos_ids=ckpt.eos_ids, max_shard_bytes=max_shard_bytes,
                progress=True)
    else:
        save_meta(ckpt.config, ckpt.state_dict, dst, progress=True)

    copy_tokenizer_files(ckpt, dst)
    return dst


def copy_tokenizer_files(ckpt, dst: Path) -> bool:
    """Copy the tokenizer files beside an HF/Meta checkpoint, or a llama2c one's tokenizer.model,
    into `dst`; False for a format whose tokenizer is not in files (GGUF)."""
    src = ckpt.path
    if ckpt.format in ("hf", "meta"):
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, dst / name)
    elif ckpt.format == "llama2c":
        found = tokenizer_file(src, ckpt.config.vocab_size)
        if found is not None:
            shutil.copyfile(found, dst / "tokenizer.model")
    else:
        return False
    return True


def _to_gguf(src: Path, dst: Path, gguf_type: str) -> Path:
    from herd.checkpoint.gguf_file import read_gguf_metadata
    from herd.checkpoint.gguf_writer import TYPES, save_gguf, tokenizer_metadata

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
