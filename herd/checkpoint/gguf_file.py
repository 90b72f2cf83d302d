"""GGUF files (llama.cpp), read with the `gguf` package: metadata -> ModelConfig, llama.cpp tensor
names -> herd's, and every tensor dequantized to a float dtype. GGUF already stores q/k in the
interleaved rotary layout. Llama 3.1-style rope scaling travels as a `rope_freqs` tensor of
per-frequency divisors rather than as metadata; it is turned back into `RopeScaling` here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from herd.checkpoint.base import Checkpoint, check_state_dict, make_config, tie_if_equal, with_family
from herd.config import ModelConfig, RopeScaling
from herd.errors import HerdError
from herd.model.transformer import rope_frequencies

MAGIC = b"GGUF"

_LAYER_NAMES = {
    "attn_norm.weight": "attention_norm.weight",
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
}


def gguf_names(n_layers: int) -> dict[str, str]:
    """llama.cpp tensor name -> herd tensor name."""
    names = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
             "output.weight": "output.weight"}
    for i in range(n_layers):
        names.update({f"blk.{i}.{g}": f"layers.{i}.{ours}" for g, ours in _LAYER_NAMES.items()})
    return names


def _open(path: Path) -> GGUFReader:
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader fails in many ways (struct, numpy, index errors) on a bad file
        raise HerdError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None


def _metadata(reader: GGUFReader) -> dict[str, Any]:
    # "GGUF.*" fields are the header (version, counts), not metadata.
    return {key: f.contents() for key, f in reader.fields.items() if not key.startswith("GGUF.")}


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The GGUF key/value metadata as plain Python values (str, int, float, bool, lists)."""
    return _metadata(_open(Path(path)))


def _f32(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(x)))


def _scaling_from_factors(path: Path, factors: np.ndarray, head_dim: int, theta: float,
                          original_max_position: int) -> RopeScaling | None:
    """Llama 3.1 scaling whose per-frequency divisors are `factors` (llama.cpp's rope_freqs)."""
    factor = float(factors.max())
    if factor == 1.0:
        return None
    scaling = RopeScaling(factor=factor, original_max_position=original_max_position)
    expected = rope_frequencies(head_dim, theta, None) / rope_frequencies(head_dim, theta, scaling)
    if factors.shape != tuple(expected.shape) or not np.allclose(factors, expected.numpy(), rtol=1e-3):
        raise HerdError(f"{path}: rope_freqs is not Llama 3.1-style rope scaling, which is all herd supports")
    return scaling


def config_from_gguf(path: Path, md: dict[str, Any], vocab_size: int, rope_factors: np.ndarray | None) -> ModelConfig:
    arch = md.get("general.architecture")
    if arch != "llama":
        raise HerdError(f"{path}: unsupported architecture {arch!r} (only llama)")
    required = ["embedding_length", "block_count", "attention.head_count", "feed_forward_length"]
    missing = [f"llama.{k}" for k in required if f"llama.{k}" not in md]
    if missing:
        raise HerdError(f"{path}: metadata lacks {', '.join(missing)}")
    if md.get("llama.expert_count", 0):
        raise HerdError(f"{path}: mixture-of-experts GGUF files are not supported")
    scaling_type = md.get("llama.rope.scaling.type", "none")
    if scaling_type != "none":
        raise HerdError(f"{path}: rope scaling type {scaling_type!r} is not supported")

    try:
        theta = _f32(md.get("llama.rope.freq_base", 10000.0))
        norm_eps = _f32(md.get("llama.attention.layer_norm_rms_epsilon", 1e-5))
    except (TypeError, ValueError):
        raise HerdError(f"{path}: llama.rope.freq_base and llama.attention.layer_norm_rms_epsilon "
                        "must be numbers") from None
    cfg = make_config(
        path, dim=md["llama.embedding_length"], n_layers=md["llama.block_count"],
        n_heads=md["llama.attention.head_count"], n_kv_heads=md.get("llama.attention.head_count_kv"),
        vocab_size=vocab_size, hidden_dim=md["llama.feed_forward_length"], norm_eps=norm_eps, rope_theta=theta,
        max_seq_len=md.get("llama.context_length", 2048), name=md.get("general.name") or path.stem,
    )
    for key in ("llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"):
        if key in md and md[key] != cfg.head_dim:
            raise HerdError(f"{path}: {key} is {md[key]}, but herd needs it to equal the head size {cfg.head_dim}")
    if rope_factors is not None:
        original = md.get("llama.rope.scaling.original_context_length", 8192)
        cfg = cfg.replace(rope_scaling=_scaling_from_factors(path, rope_factors, cfg.head_dim, theta, original))
    return cfg


def _tensor(path: Path, t, dtype: torch.dtype) -> torch.Tensor:
    shape = tuple(int(x) for x in reversed(t.shape))  # GGML lists the fastest-varying dimension first
    if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        values = np.array(t.data)
    else:
        try:
            values = dequantize(t.data, t.tensor_type)
        except (NotImplementedError, KeyError, ValueError) as e:
            raise HerdError(f"{path}: cannot dequantize tensor {t.name} of type {t.tensor_type.name} ({e})") from None
    return torch.from_numpy(values.reshape(shape)).to(dtype)


def load_gguf(path: Path, dtype: torch.dtype | None = None, tokenizer: bool = True) -> Checkpoint:
    """dtype None means float32: GGUF files mix float and quantized types."""
    dtype = dtype or torch.float32
    reader = _open(path)
    md = _metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise HerdError(f"{path}: no token_embd.weight tensor")
    rope_freqs = tensors.pop("rope_freqs.weight", None)
    factors = None if rope_freqs is None else np.array(rope_freqs.data, dtype=np.float32).reshape(-1)
    vocab_size = int(tensors["token_embd.weight"].shape[1])
    cfg = config_from_gguf(path, md, vocab_size, factors)

    names = gguf_names(cfg.n_layers)
    state_dict = {}
    for name, t in tensors.items():
        if name not in names:
            raise HerdError(f"{path}: unexpected tensor {name} for a {cfg.n_layers}-layer Llama")
        state_dict[names[name]] = _tensor(path, t, dtype)
    cfg = with_family(tie_if_equal(cfg.replace(tie_embeddings="output.weight" not in state_dict), state_dict))
    check_state_dict(path, cfg, state_dict)

    return Checkpoint(cfg, state_dict, "gguf", path, *gguf_extras(md, tokenizer))


def gguf_extras(md: dict[str, Any], tokenizer: bool = True) -> tuple[Any, str | None, set[int]]:
    """The embedded tokenizer (when asked for and present), chat template and end-of-sequence ids."""
    tok = None
    if tokenizer and "tokenizer.ggml.model" in md:
        from herd.tokenizer import tokenizer_from_gguf

        tok = tokenizer_from_gguf(md)
    eos = {md[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                           "tokenizer.ggml.eom_token_id") if isinstance(md.get(k), int)}
    return tok, md.get("tokenizer.chat_template"), eos
