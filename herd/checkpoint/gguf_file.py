"""GGUF files (llama.cpp): a bounded reader of the header (the `gguf` package's reader trusts the
file's counts and takes seconds on a 49K-token vocabulary), metadata -> ModelConfig, llama.cpp
tensor names -> herd's, and every tensor dequantized (by the `gguf` package) to a float dtype.
GGUF already stores q/k in the interleaved rotary layout. Llama 3.1-style rope scaling travels as
a `rope_freqs` tensor of per-frequency divisors rather than as metadata; it is turned back into
`RopeScaling` here.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from herd.checkpoint.base import Checkpoint, check_fits, check_shapes, make_config, with_family
from herd.config import MAX_CONTEXT, ModelConfig, RopeScaling
from herd.errors import HerdError
from herd.model.transformer import rope_frequencies
from herd.tokenizer import Tokenizer, tokenizer_from_gguf

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


# value types of GGUF metadata: struct format, or a marker for strings (8), arrays (9), bool (7)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          10: np.uint64, 11: np.int64, 12: np.float64}
# the fewest bytes a value of each type takes in the file: what bounds a count read from it
_MIN_BYTES = {**{k: struct.calcsize("<" + f) for k, f in _SCALARS.items()}, 7: 1, 8: 8, 9: 12}
_KV_MIN_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
_TENSOR_MIN_BYTES = 8 + 4 + 8 + 4 + 8  # name length, dimension count, one dimension, type, offset
_MAX_ITEMS = 1 << 24  # in one metadata array: vocabularies hold a few 100K tokens, merges about 1M
_MAX_NESTING = 2  # arrays of arrays; llama.cpp writes none


class _Corrupt(Exception):
    """A GGUF file whose layout is not what it says."""


class _Cursor:
    """Reads values from a GGUF header, checking every count read against the bytes left."""

    def __init__(self, data: memoryview):
        self.data, self.pos = data, 0

    def take(self, fmt: str, where: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise _Corrupt(f"the file ends inside {where}")
        self.pos += size
        return struct.unpack_from("<" + fmt, self.data, self.pos - size)[0]

    def count(self, what: str, item_bytes: int, limit: int, unit: str = "items") -> int:
        """A u64 count of items taking at least `item_bytes` each."""
        n = self.take("Q", what)
        left = len(self.data) - self.pos
        if n * item_bytes > left:
            raise _Corrupt(f"{what} claims {n:,} {unit}, more than the {left:,} bytes left hold")
        if n > limit:
            raise _Corrupt(f"{what} claims {n:,} {unit}; herd reads at most {limit:,}")
        return n

    def string(self, what: str) -> str:
        n = self.count(f"the string of {what}", 1, len(self.data), "bytes")
        self.pos += n
        return bytes(self.data[self.pos - n: self.pos]).decode("utf-8", errors="replace")

    def name(self, what: str) -> str:
        """A metadata key or tensor name: printable text, since errors quote it."""
        text = self.string(what)
        if not text.isprintable():
            raise _Corrupt(f"{what} is not printable text: {text[:100]!r}")
        return text

    def value(self, kind: int, key: str, depth: int = 0) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind], key)
        if kind == 7:
            return bool(self.take("B", key))
        if kind == 8:
            return self.string(key)
        if kind == 9 and depth < _MAX_NESTING:
            sub = self.take("I", key)
            if sub not in _MIN_BYTES:
                raise _Corrupt(f"{key} has unknown metadata value type {sub}")
            n = self.count(f"metadata array {key}", _MIN_BYTES[sub], _MAX_ITEMS)
            if sub in _NUMPY:
                dtype = np.dtype(_NUMPY[sub]).newbyteorder("<")
                self.pos += n * dtype.itemsize
                return np.frombuffer(self.data, dtype, n, self.pos - n * dtype.itemsize).tolist()
            return [self.value(sub, key, depth + 1) for _ in range(n)]
        raise _Corrupt(f"{key} has unknown metadata value type {kind}" if kind != 9 else
                       f"{key} nests arrays more than {_MAX_NESTING} deep")

    def tensor_info(self) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        """(name, shape slowest dimension first, type, offset in the data section)."""
        name = self.name("a tensor name")
        n_dims = self.take("I", name)
        if not 1 <= n_dims <= 4:
            raise _Corrupt(f"tensor {name} has {n_dims:,} dimensions (GGUF allows 1 to 4)")
        dims = [self.take("Q", name) for _ in range(n_dims)]
        kind = self.take("I", name)
        if kind not in GGML_QUANT_SIZES:
            raise _Corrupt(f"tensor {name} has unknown type {kind}")
        return name, tuple(reversed(dims)), GGMLQuantizationType(kind), self.take("Q", name)


def _tensor_data(raw: np.ndarray, start: int, align: int, name: str, shape: tuple[int, ...],
                 kind: GGMLQuantizationType, offset: int) -> np.ndarray:
    """The bytes of one tensor, checked to lie inside the file."""
    block, size = GGML_QUANT_SIZES[kind]
    if shape[-1] % block:
        raise _Corrupt(f"tensor {name} has rows of {shape[-1]:,} values, not whole blocks of {block} ({kind.name})")
    nbytes = math.prod(shape) // block * size
    if offset % align or start + offset + nbytes > len(raw):
        raise _Corrupt(f"tensor {name} of shape {list(shape)} ({nbytes:,} bytes at offset {offset:,}) runs past "
                       f"the end of the file or is misaligned")
    return raw[start + offset: start + offset + nbytes]


class GGUFFile:
    """A GGUF file's metadata (plain Python values) and tensors (memory-mapped raw bytes). Every
    count, length and offset the file gives is checked against what the file holds before anything
    is built from it, so a lying file costs no more memory than its own size."""

    def __init__(self, path: str | Path):
        self.path = path = Path(path)
        try:
            self.raw = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable, never written
        except (OSError, ValueError) as e:
            raise HerdError(f"{path}: cannot read GGUF file ({e})") from None
        try:
            self._read_header(_Cursor(memoryview(self.raw)))
        except _Corrupt as e:
            raise HerdError(f"{path}: corrupt or truncated GGUF file ({e})") from None

    def _read_header(self, cur: _Cursor) -> None:
        if bytes(self.raw[:4]) != MAGIC:
            raise _Corrupt("not a GGUF file")
        cur.pos = 4
        version = cur.take("I", "the header")
        if version not in (2, 3):
            raise _Corrupt(f"GGUF version {version} (herd reads 2 and 3)")
        n_tensors = cur.count("the header's count of tensors", _TENSOR_MIN_BYTES, _MAX_ITEMS)
        n_kv = cur.count("the header's count of metadata entries", _KV_MIN_BYTES, _MAX_ITEMS)
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.name("a metadata key")
            if key in self.metadata:
                raise _Corrupt(f"metadata key {key} appears twice")
            self.metadata[key] = cur.value(cur.take("I", key), key)
        infos = [cur.tensor_info() for _ in range(n_tensors)]
        align = self.metadata.get("general.alignment", 32)
        if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
            raise _Corrupt(f"general.alignment must be a power of two, got {align!r}")
        start = (cur.pos + align - 1) // align * align
        self.tensors: dict[str, tuple[tuple[int, ...], GGMLQuantizationType, np.ndarray]] = {}
        for name, shape, kind, offset in infos:
            if name in self.tensors:
                raise _Corrupt(f"tensor {name} appears twice")
            self.tensors[name] = (shape, kind, _tensor_data(self.raw, start, align, name, shape, kind, offset))


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The GGUF key/value metadata as plain Python values (str, int, float, bool, lists)."""
    return GGUFFile(path).metadata


def gguf_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer a GGUF model file embeds."""
    md = read_gguf_metadata(path)
    if "tokenizer.ggml.model" not in md:
        raise HerdError(f"{path}: this GGUF file holds no vocabulary (no tokenizer.ggml.model)")
    return tokenizer_from_gguf(md)


def _f32(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(x)))


def _scaling_from_factors(path: Path, factors: np.ndarray, head_dim: int, theta: float,
                          original_max_position: Any) -> RopeScaling | None:
    """Llama 3.1 scaling whose per-frequency divisors are `factors` (llama.cpp's rope_freqs)."""
    if factors.shape != (head_dim // 2,):
        raise HerdError(f"{path}: rope_freqs holds {factors.size} values; a head of {head_dim} needs {head_dim // 2}")
    factor = float(factors.max())
    if factor == 1.0:
        return None
    if not (np.isfinite(factors).all() and (factors > 0).all() and isinstance(original_max_position, int)
            and not isinstance(original_max_position, bool) and 0 < original_max_position <= MAX_CONTEXT):
        raise HerdError(f"{path}: rope_freqs must hold positive numbers, and "
                        f"llama.rope.scaling.original_context_length be a positive integer, got {original_max_position!r}")
    scaling = RopeScaling(factor=factor, original_max_position=original_max_position)
    expected = rope_frequencies(head_dim, theta, None) / rope_frequencies(head_dim, theta, scaling)
    if not np.allclose(factors, expected.numpy(), rtol=1e-3):
        raise HerdError(f"{path}: rope_freqs is not Llama 3.1-style rope scaling, which is all herd supports")
    return scaling


# herd's config field -> the GGUF metadata it comes from, to name it in errors
_KEYS = {"dim": "llama.embedding_length", "n_layers": "llama.block_count", "n_heads": "llama.attention.head_count",
         "n_kv_heads": "llama.attention.head_count_kv", "vocab_size": "the rows of token_embd.weight",
         "hidden_dim": "llama.feed_forward_length", "norm_eps": "llama.attention.layer_norm_rms_epsilon",
         "rope_theta": "llama.rope.freq_base", "max_seq_len": "llama.context_length"}


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
    name = md.get("general.name")
    cfg = make_config(
        path, _KEYS, dim=md["llama.embedding_length"], n_layers=md["llama.block_count"],
        n_heads=md["llama.attention.head_count"], n_kv_heads=md.get("llama.attention.head_count_kv"),
        vocab_size=vocab_size, hidden_dim=md["llama.feed_forward_length"], norm_eps=norm_eps, rope_theta=theta,
        max_seq_len=md.get("llama.context_length", 2048), name=name if isinstance(name, str) and name else path.stem,
    )
    for key in ("llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"):
        if key in md and md[key] != cfg.head_dim:
            raise HerdError(f"{path}: {key} is {md[key]!r}, but herd needs it to equal the head size {cfg.head_dim}")
    if rope_factors is not None:
        original = md.get("llama.rope.scaling.original_context_length", 8192)
        cfg = cfg.replace(rope_scaling=_scaling_from_factors(path, rope_factors, cfg.head_dim, theta, original))
    return cfg


def to_float(path: Path, name: str, shape: tuple[int, ...], kind: GGMLQuantizationType, data: np.ndarray) -> np.ndarray:
    """A GGUF tensor's values as float32 of its shape (a view of the file for F32 tensors)."""
    if kind == GGMLQuantizationType.F32:
        return data.view(np.float32).reshape(shape)
    try:
        return np.asarray(dequantize(data, kind), dtype=np.float32).reshape(shape)
    except (NotImplementedError, KeyError, ValueError) as e:
        raise HerdError(f"{path}: cannot dequantize tensor {name} of type {kind.name} ({e})") from None


def open_gguf(path: Path) -> tuple[GGUFFile, ModelConfig, dict[str, str]]:
    """A GGUF file, the config it describes and llama.cpp name -> herd name of its tensors, checked
    against the tensors' names and shapes before any tensor is read. rope_freqs is taken out of
    `tensors` (it becomes the config's rope scaling); a tied output.weight is left in but unnamed."""
    f = GGUFFile(path)
    tensors = f.tensors
    if "token_embd.weight" not in tensors:
        raise HerdError(f"{path}: no token_embd.weight tensor")
    rope = tensors.pop("rope_freqs.weight", None)
    factors = None if rope is None else to_float(path, "rope_freqs.weight", *rope).reshape(-1)
    emb_shape, emb_kind, emb_data = tensors["token_embd.weight"]
    cfg = config_from_gguf(path, f.metadata, emb_shape[0], factors)
    check_fits(path, cfg, len(tensors), sum(math.prod(shape) for shape, _, _ in tensors.values()))
    names = gguf_names(cfg.n_layers)
    unknown = [n for n in tensors if n not in names]
    if unknown:
        raise HerdError(f"{path}: unexpected tensor {unknown[0]} for a {cfg.n_layers}-layer Llama")
    out = tensors.get("output.weight")
    tied = out is None or (out[1] == emb_kind and out[0] == emb_shape and np.array_equal(out[2], emb_data))
    if tied:
        names.pop("output.weight")
    cfg = with_family(cfg.replace(tie_embeddings=tied))
    check_shapes(path, cfg, {names[n]: shape for n, (shape, _, _) in tensors.items() if n in names})
    return f, cfg, names


def load_gguf(path: Path, dtype: torch.dtype | None = None, tokenizer: bool = True) -> Checkpoint:
    """dtype None means float32: GGUF files mix float and quantized types."""
    f, cfg, names = open_gguf(path)
    state_dict = {names[n]: torch.from_numpy(to_float(path, n, shape, kind, data)).to(dtype or torch.float32)
                  for n, (shape, kind, data) in f.tensors.items() if n in names}
    return Checkpoint(cfg, state_dict, "gguf", path, *gguf_extras(f.metadata, tokenizer))


def gguf_extras(md: dict[str, Any], tokenizer: bool = True) -> tuple[Any, str | None, set[int]]:
    """The embedded tokenizer (when asked for and present), chat template and end-of-sequence ids."""
    tok = None
    if tokenizer and "tokenizer.ggml.model" in md:
        tok = tokenizer_from_gguf(md)
    eos = {md[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                           "tokenizer.ggml.eom_token_id") if isinstance(md.get(k), int)}
    template = md.get("tokenizer.chat_template")
    return tok, template if isinstance(template, str) else None, eos
