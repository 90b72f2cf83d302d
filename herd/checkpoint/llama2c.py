"""llama2.c's legacy (version 0) .bin: a header of 7 int32 (dim, hidden_dim, n_layers, n_heads,
n_kv_heads, vocab_size, seq_len) and then every weight as fp32, grouped by kind across layers.
A negative vocab_size means the classifier is stored separately at the end; otherwise it is
the embedding. Rotary pairs are interleaved, as in Meta's code. Read-only: nothing writes it now.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from herd.checkpoint.base import Checkpoint, check_state_dict, make_config, tokenizer_file, with_family
from herd.errors import HerdError
from herd.tokenizer import load_tokenizer

HEADER_BYTES = 28
_VERSIONED_MAGIC = 0x616B3432  # "ak42": llama2.c's later export versions, which add a header of their own


def read_header(path: Path) -> tuple[int, ...] | None:
    """The 7 header ints if they describe a plausible model (positive sizes, heads that divide
    evenly), else None."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        return None
    header = tuple(int(x) for x in np.frombuffer(raw, dtype="<i4"))
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = header
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, seq_len) <= 0 or vocab == 0:
        return None
    if dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        return None
    return header


def is_versioned_export(path: Path) -> bool:
    with open(path, "rb") as f:
        raw = f.read(4)
    return len(raw) == 4 and int(np.frombuffer(raw, dtype="<u4")[0]) == _VERSIONED_MAGIC


def _layout(header: tuple[int, ...]) -> list[tuple[str | None, int, tuple[int, ...]]]:
    """(name with {i} for the layer, how many, shape of one) for each block in file order; name
    None for the precomputed rotary tables, which the model recomputes."""
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = header
    head_dim = dim // n_heads
    kv_dim = n_kv_heads * head_dim
    vocab = abs(vocab)
    blocks = [
        ("tok_embeddings.weight", 1, (vocab, dim)),
        ("layers.{i}.attention_norm.weight", n_layers, (dim,)),
        ("layers.{i}.attention.wq.weight", n_layers, (dim, dim)),
        ("layers.{i}.attention.wk.weight", n_layers, (kv_dim, dim)),
        ("layers.{i}.attention.wv.weight", n_layers, (kv_dim, dim)),
        ("layers.{i}.attention.wo.weight", n_layers, (dim, dim)),
        ("layers.{i}.ffn_norm.weight", n_layers, (dim,)),
        ("layers.{i}.feed_forward.w1.weight", n_layers, (hidden, dim)),
        ("layers.{i}.feed_forward.w2.weight", n_layers, (dim, hidden)),
        ("layers.{i}.feed_forward.w3.weight", n_layers, (hidden, dim)),
        ("norm.weight", 1, (dim,)),
        (None, 2, (seq_len, head_dim // 2)),  # freq_cis_real, freq_cis_imag
    ]
    if header[5] < 0:
        blocks.append(("output.weight", 1, (vocab, dim)))
    return blocks


def load_llama2c(path: Path, dtype: torch.dtype | None = None, tokenizer: bool = True) -> Checkpoint:
    header = read_header(path)
    if header is None:
        raise HerdError(f"{path}: not a llama2.c checkpoint (implausible header)")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = header
    blocks = _layout(header)
    floats = sum(count * math.prod(shape) for _, count, shape in blocks)
    size = path.stat().st_size
    if size != HEADER_BYTES + 4 * floats:
        raise HerdError(f"{path}: {size} bytes, but the header (dim {dim}, {n_layers} layers, vocab {abs(vocab)}) "
                        f"needs {HEADER_BYTES + 4 * floats}: truncated or corrupt")
    cfg = make_config(path, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                      vocab_size=abs(vocab), hidden_dim=hidden, tie_embeddings=vocab > 0, max_seq_len=seq_len,
                      name=path.stem)
    cfg = with_family(cfg)

    data = np.memmap(path, dtype="<f4", mode="r", offset=HEADER_BYTES)
    state_dict: dict[str, torch.Tensor] = {}
    offset = 0
    for name, count, shape in blocks:
        n = math.prod(shape)
        for i in range(count):
            if name is not None:
                t = torch.from_numpy(np.array(data[offset:offset + n]).reshape(shape))
                state_dict[name.format(i=i)] = t if dtype is None else t.to(dtype)
            offset += n
    check_state_dict(path, cfg, state_dict)

    tok = None
    tok_file = tokenizer_file(path, cfg.vocab_size)
    if tokenizer and tok_file is not None:
        tok = load_tokenizer(tok_file)
    return Checkpoint(cfg, state_dict, "llama2c", path, tok)

