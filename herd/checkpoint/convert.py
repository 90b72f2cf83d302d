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
            max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write the checkpoint at `src` to the new directory `dst` in format `to` ("hf" or "meta"),
    optionally cast to `dtype`. A GGUF's embedded vocabulary is not exported."""
    if to not in ("hf", "meta"):
        raise HerdError(f"cannot convert to {to!r}: the target format must be 'hf' or 'meta'")
    src, dst = Path(src), Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise HerdError(f"{dst}: already exists and is not an empty directory")
    ckpt = load_checkpoint(src, dtype, tokenizer=False)
    if to == "hf":
        save_hf(ckpt.config, ckpt.state_dict, dst, eos_ids=ckpt.eos_ids, max_shard_bytes=max_shard_bytes,
                progress=True)
    else:
        save_meta(ckpt.config, ckpt.state_dict, dst, progress=True)

    if ckpt.format in ("hf", "meta"):
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, dst / name)
    elif ckpt.format == "llama2c":
        found = tokenizer_file(src, ckpt.config.vocab_size)
        if found is not None:
            shutil.copyfile(found, dst / "tokenizer.model")
    return dst
