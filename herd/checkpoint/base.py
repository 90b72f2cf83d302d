"""What every checkpoint reader produces (`Checkpoint`) and the checks they share.

A reader turns a file into a `ModelConfig` plus a state dict in herd's names and Meta's
interleaved rotary layout; everything past that point is format-free.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from herd.config import CONFIGS, ConfigError, ModelConfig
from herd.errors import HerdError
from herd.model.transformer import Transformer
from herd.tokenizer import Tokenizer, load_tokenizer

# Files beside HF / Meta weights that describe the tokenizer, chat template and stop tokens.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]  # herd names; no output.weight when embeddings are tied
    format: str  # "hf" | "meta" | "llama2c" | "gguf"
    path: Path
    tokenizer: Tokenizer | None = None
    chat_template: str | None = None
    eos_ids: set[int] = field(default_factory=set)


def make_config(path: Path, names: Mapping[str, str] = MappingProxyType({}), /, **fields: Any) -> ModelConfig:
    """A ModelConfig from a file's fields; an invalid one is blamed on the file, each wrong field
    called by the file's key for it (`names`: herd's field -> the file's key)."""
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise HerdError(f"{path}: invalid model config: " + "; ".join(e.config.problems(names))) from None
    except HerdError as e:
        raise HerdError(f"{path}: {e}") from None


def check_fits(path: Path, cfg: ModelConfig, n_tensors: int, n_values: int) -> None:
    """Refuse a config far beyond what the checkpoint's `n_tensors` tensors of `n_values` values in
    all can hold, before a model of it is built: every layer has tensors of its own, and the
    parameters are stored. (A smaller mismatch is left to `check_shapes`, which names the tensor.)"""
    if cfg.n_layers > n_tensors:
        raise HerdError(f"{path}: the config has {cfg.n_layers} layers, but the checkpoint holds only "
                        f"{n_tensors} tensors")
    implied = cfg.num_params()
    if implied > 2 * n_values:
        raise HerdError(f"{path}: the config implies {implied:,} parameters, but the checkpoint holds only "
                        f"{n_values:,} values")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint of `cfg` holds (read off a model on the meta device)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if cfg.tie_embeddings:
        del shapes["output.weight"]
    return shapes


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_shapes(path: Path, cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise if the tensors named in `shapes` (herd names, as a file's header lists them) are not
    exactly those `cfg` needs, with the shapes it needs; a model of `cfg` on the meta device says
    which, so nothing is allocated."""
    expected = expected_shapes(cfg)
    missing = [name for name in expected if name not in shapes]
    if missing:
        raise HerdError(f"{path}: tensors missing for this config: {_some(missing)}")
    unexpected = [name for name in shapes if name not in expected]
    if unexpected:
        raise HerdError(f"{path}: unexpected tensors for this config: {_some(unexpected)}")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise HerdError(f"{path}: tensor {name} has shape {list(shapes[name])}, the config needs {list(shape)}")


def check_state_dict(path: Path, cfg: ModelConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise if the tensors are not exactly those `cfg` needs, with the shapes it needs."""
    check_shapes(path, cfg, {name: tuple(t.shape) for name, t in state_dict.items()})


def check_writable(out: Path, cfg: ModelConfig) -> None:
    """The writers lay out Llama 1-3 checkpoints only."""
    if cfg.moe or cfg.nope_layer_step or cfg.attention_chunk_size or cfg.qk_norm or cfg.attn_temperature:
        raise HerdError(f"{out}: writing Llama 4 (mixture-of-experts) checkpoints is not supported")


def tie_if_equal(cfg: ModelConfig, state_dict: dict[str, torch.Tensor]) -> ModelConfig:
    """Formats with no tie flag (Meta's, GGUF) store a tied classifier as a copy of the embedding;
    recognise the copy and drop it, so the model shares one tensor as it was trained to."""
    out, emb = state_dict.get("output.weight"), state_dict.get("tok_embeddings.weight")
    if out is not None and emb is not None and out.shape == emb.shape and torch.equal(out, emb):
        del state_dict["output.weight"]
        return cfg.replace(tie_embeddings=True)
    return cfg


# What tells released models apart: shapes, plus rope theta (Code Llama), norm eps (Llama 1 vs 2)
# and whether rope is scaled (Llama 3 vs 3.1).
_MATCH_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "rope_theta", "norm_eps",
                 "tie_embeddings")


def registered_match(cfg: ModelConfig) -> ModelConfig | None:
    """The registered config with the same shapes, if any: it names the family (tokenizer and chat
    defaults) and fills in what a format leaves unsaid (Meta's params.json has no context length)."""
    for known in CONFIGS.values():
        if all(getattr(known, f) == getattr(cfg, f) for f in _MATCH_FIELDS) and \
                (known.rope_scaling is None) == (cfg.rope_scaling is None):
            return known
    return None


def with_family(cfg: ModelConfig) -> ModelConfig:
    known = registered_match(cfg)
    return cfg.replace(family=known.family) if known else cfg


def one_line(text: str) -> str:
    """`text` (a library's error, which may quote a file) with its line breaks made spaces."""
    return " ".join(text.splitlines())


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise HerdError(f"{path}: cannot read it as UTF-8 text ({e})") from None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file (every side file of a checkpoint is one)."""
    try:
        value = json.loads(read_text(path))
    except (json.JSONDecodeError, RecursionError) as e:
        raise HerdError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(value, dict):
        raise HerdError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def check_dtype(dtype: torch.dtype | None) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise HerdError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")


def eos_list(value: Any) -> set[int]:
    """eos_token_id as config files write it: an int, a list of ints, or null."""
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int)}
    return set()


def directory_extras(directory: Path, tokenizer: bool) -> tuple[Tokenizer | None, str | None, set[int]]:
    """Tokenizer, chat template and end-of-sequence ids from the Hugging Face-style files that sit
    beside the weights (HF and Meta directories alike)."""
    tok = None
    if tokenizer and ((directory / "tokenizer.json").exists() or (directory / "tokenizer.model").exists()):
        tok = load_tokenizer(directory)

    template = None
    if (directory / "chat_template.jinja").exists():
        template = read_text(directory / "chat_template.jinja")
    elif (directory / "tokenizer_config.json").exists():
        template = read_json(directory / "tokenizer_config.json").get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")

    eos: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        if not eos and (directory / name).exists():
            eos = eos_list(read_json(directory / name).get("eos_token_id"))
    return tok, template if isinstance(template, str) else None, eos


def tokenizer_file(path: Path, vocab_size: int) -> Path | None:
    """The SentencePiece model beside a .bin: tokenizer.model, or tok{vocab}.model as
    llama2.c names its custom vocabularies."""
    for candidate in (path.parent / "tokenizer.model", path.parent / f"tok{vocab_size}.model"):
        if candidate.exists():
            return candidate
    return None


def copy_tokenizer_files(ckpt: Checkpoint, dst: Path) -> bool:
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
