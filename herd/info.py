"""`herd info`: a config in words, with its parameter count and memory footprint."""

from __future__ import annotations

from pathlib import Path

from herd.config import CONFIGS, ModelConfig, get_config

# Bytes per weight of each storage format; the quantized ones include their scales.
BYTES_PER_PARAM = {"float32": 4.0, "bfloat16/float16": 2.0, "int8 (per channel)": 1.0, "int4 (group 32)": 0.5 + 2 / 32}


def describe(model: str) -> str:
    if model == "list":
        return "\n".join(f"{name:26s} {_billions(cfg.num_params())}" for name, cfg in CONFIGS.items())
    if Path(model).exists():
        from herd.checkpoint import load_checkpoint  # torch: not imported by `herd --help`, which imports this

        cfg = load_checkpoint(model, tokenizer=False).config
    else:
        cfg = get_config(model)
    return format_config(cfg)


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
