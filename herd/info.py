"""`herd info`: a config in words, with its parameter count and memory footprint."""

from __future__ import annotations

import os
from pathlib import Path

from herd.config import CONFIGS, ModelConfig, get_config
from herd.errors import HerdError

# Bytes per weight of each storage format; the quantized ones include their scales.
BYTES_PER_PARAM = {"float32": 4.0, "bfloat16/float16": 2.0, "int8 (per channel)": 1.0, "int4 (group 32)": 0.5 + 2 / 32}


def checkpoint_path(model: str) -> Path | None:
    """The checkpoint `model` names, as every command reads a model argument (a path, a model in
    the store, a model that can be pulled), or None when it names a registered config instead
    (`herd info` and `herd bench` take those too: a shape, with random weights)."""
    if not os.path.exists(os.path.expanduser(model)) and model.lower() in CONFIGS:
        return None
    from herd.store import resolve_model  # tqdm: not imported by `herd --help`, which imports this

    try:
        return resolve_model(model)[0]
    except HerdError as e:
        raise HerdError(f"{e}; or name a registered config (`herd info list`)") from None


def describe(model: str) -> str:
    if model == "list":
        return "\n".join(f"{name:26s} {_billions(cfg.num_params())}" for name, cfg in CONFIGS.items())
    path = checkpoint_path(model)
    if path is None:
        return format_config(get_config(model))
    from herd.checkpoint import read_config  # torch, as above

    return format_config(read_config(path))


def format_config(cfg: ModelConfig) -> str:
    n = cfg.num_params()
    lines = [f"{cfg.name or 'model'}: {_billions(n)} parameters ({n:,})"]
    if cfg.moe is not None:
        lines[0] += f", {_billions(cfg.num_params(active=True))} active per token"
    for key, value in cfg.to_dict().items():
        if key != "name":
            lines.append(f"  {key:16s} {value}")
    lines.append(f"  {'head_dim':16s} {cfg.head_dim}")
    lines.append("memory of the weights:")
    for fmt, nbytes in BYTES_PER_PARAM.items():
        lines.append(f"  {fmt:20s} {_gib(n * nbytes)}")
    lines.append(f"KV cache per 1,000 tokens: {_gib(cfg.kv_cache_bytes(1000, 2))} in 16-bit, "
                 f"{_gib(cfg.kv_cache_bytes(1000, 4))} in fp32")
    return "\n".join(lines)


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"
