"""GGUF files loaded as they are stored: quantized tensors repacked into herd's packed formats
(no dequantization), 16- and 32-bit tensors memory-mapped.

    Q8_0 -> q8, group 32, fp16 scales      Q4_0 -> q4, group 32, symmetric
    Q4_1 -> q4, group 32, fp16 scales      Q4_K -> q4, group 32, fp32 scales (d * sc, -dmin * m)
    Q6_K -> q8, group 16, fp32 scales      F16, BF16 -> f16, bf16;  F32 -> fp32
Any other type is dequantized to fp32 (gguf-py), so every file llama.cpp writes for a Llama still
loads. The header is parsed here rather than with gguf.GGUFReader, which takes seconds on a
49k-token vocabulary; the values come out as the same plain Python values.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import Q4_K, dequantize
from torch import nn

from herd.checkpoint.base import Checkpoint, expected_shapes, with_family
from herd.checkpoint.gguf_file import MAGIC, config_from_gguf, gguf_extras, gguf_names
from herd.errors import HerdError
from herd.model import Transformer
from herd.quant.linear import PackedEmbedding, PackedLinear

T = GGMLQuantizationType

# value types of GGUF metadata: struct format, or a marker for strings (8), arrays (9), bool (7)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          10: np.uint64, 11: np.int64, 12: np.float64}


class _Cursor:
    def __init__(self, data: memoryview, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, fmt: str):
        value = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.take("Q")
        raw = bytes(self.data[self.pos: self.pos + n])
        if len(raw) != n:
            raise struct.error("string runs past the end of the file")
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == 7:
            return bool(self.take("B"))
        if kind == 8:
            return self.string()
        if kind == 9:
            sub, n = self.take("I"), self.take("Q")
            if sub in _NUMPY:
                dtype = np.dtype(_NUMPY[sub]).newbyteorder("<")
                values = np.frombuffer(self.data, dtype, n, self.pos)
                self.pos += n * dtype.itemsize
                return values.tolist()
            return [self.value(sub) for _ in range(n)]
        raise struct.error(f"unknown metadata value type {kind}")


class GGUFFile:
    """A GGUF file's metadata (plain Python values) and tensors (memory-mapped raw bytes)."""

    def __init__(self, path: str | Path):
        self.path = path = Path(path)
        try:
            self.raw = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable, never written
            cur = _Cursor(memoryview(self.raw), path)
            if bytes(self.raw[:4]) != MAGIC:
                raise struct.error("not a GGUF file")
            cur.pos = 4
            version, n_tensors, n_kv = cur.take("I"), cur.take("Q"), cur.take("Q")
            if version not in (2, 3):
                raise struct.error(f"GGUF version {version} (herd reads 2 and 3)")
            self.metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = cur.string()
                self.metadata[key] = cur.value(cur.take("I"))
            infos = []
            for _ in range(n_tensors):
                name = cur.string()
                dims = [cur.take("Q") for _ in range(cur.take("I"))]
                infos.append((name, tuple(reversed(dims)), T(cur.take("I")), cur.take("Q")))
            align = self.metadata.get("general.alignment", 32)
            start = (cur.pos + align - 1) // align * align
            self.tensors: dict[str, tuple[tuple[int, ...], GGMLQuantizationType, np.ndarray]] = {}
            for name, shape, kind, offset in infos:
                block, size = GGML_QUANT_SIZES[kind]
                nbytes = int(np.prod(shape)) // block * size
                data = self.raw[start + offset: start + offset + nbytes]
                if len(data) != nbytes:
                    raise struct.error(f"tensor {name} runs past the end of the file")
                self.tensors[name] = (shape, kind, data)
        except (struct.error, ValueError, KeyError, OverflowError, OSError) as e:
            raise HerdError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None


def _blocks(data: np.ndarray, shape: tuple[int, ...], block_bytes: int) -> np.ndarray:
    n = shape[0]
    return data.reshape(n, -1, block_bytes)


def _half(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a).view(np.float16).reshape(a.shape[:-1]))


def _pack_nibbles(values: np.ndarray) -> torch.Tensor:
    """values 0..15 [N, K / 32, 32] -> the q4 layout (pairs of blocks share bytes)."""
    pairs = values.reshape(values.shape[0], -1, 2, 32)
    return torch.from_numpy((pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(values.shape[0], -1))


def _ggml_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_0/Q4_1 quants [N, blocks, 16] -> values [N, blocks, 32] (low nibbles first)."""
    return np.concatenate((qs & 15, qs >> 4), axis=-1)


def repack(kind: GGMLQuantizationType, shape: tuple[int, ...], data: np.ndarray) -> tuple[str, int | None, dict] | None:
    """(format, group size, tensors) of a GGUF tensor in a packed format, or None if it has none."""
    n, k = shape
    if kind in (T.F16, T.BF16):
        w = torch.from_numpy(data.view(np.int16).reshape(n, k))
        return ("f16", None, {"weight": w.view(torch.float16)}) if kind == T.F16 else \
            ("bf16", None, {"weight": w.view(torch.bfloat16)})
    if kind == T.Q8_0:
        b = _blocks(data, shape, 34)
        return "q8", 32, {"qweight": torch.from_numpy(np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(n, k)),
                          "scales": _half(b[..., :2])}
    if kind in (T.Q4_0, T.Q4_1) and k % 64 == 0:
        b = _blocks(data, shape, 18 if kind == T.Q4_0 else 20)
        packed = {"qweight": _pack_nibbles(_ggml_nibbles(b[..., -16:])), "scales": _half(b[..., :2])}
        if kind == T.Q4_1:
            packed["mins"] = _half(b[..., 2:4])
        return "q4", 32, packed
    if kind == T.Q4_K:
        b = _blocks(data, shape, 144)
        d, dmin = (_half(b[..., i:i + 2]).float().numpy()[..., None] for i in (0, 2))
        sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(b[..., 4:16]).reshape(-1, 12))
        scales = (d * sc.reshape(n, -1, 8).astype(np.float32)).reshape(n, -1)
        mins = -(dmin * mn.reshape(n, -1, 8).astype(np.float32)).reshape(n, -1)
        qweight = torch.from_numpy(np.ascontiguousarray(b[..., 16:]).reshape(n, k // 2))
        return "q4", 32, {"qweight": qweight, "scales": torch.from_numpy(scales), "mins": torch.from_numpy(mins)}
    if kind == T.Q6_K:
        b = _blocks(data, shape, 210)
        ql = b[..., :128].reshape(n, -1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)
        ql = (ql & 15).reshape(n, -1, 8, 32)
        qh = b[..., 128:192].reshape(n, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)
        qh = (qh & 3).reshape(n, -1, 8, 32)
        q = ((ql | (qh << 4)).astype(np.int8) - 32).reshape(n, k)
        d = _half(b[..., 208:210]).float().numpy()[..., None]
        scales = (d * np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.float32)).reshape(n, -1)
        return "q8", 16, {"qweight": torch.from_numpy(q), "scales": torch.from_numpy(scales)}
    return None


def _float(path: Path, name: str, kind: GGMLQuantizationType, shape: tuple[int, ...], data: np.ndarray) -> torch.Tensor:
    if kind == T.F32:
        return torch.from_numpy(data.view(np.float32).reshape(shape))
    try:
        return torch.from_numpy(np.ascontiguousarray(dequantize(data, kind), dtype=np.float32).reshape(shape))
    except (NotImplementedError, KeyError, ValueError) as e:
        raise HerdError(f"{path}: cannot dequantize tensor {name} of type {kind.name} ({e})") from None


def _module(path: Path, name: str, kind, shape, data) -> nn.Module:
    packed = repack(kind, shape, data) if len(shape) == 2 else None
    if packed is not None:
        fmt, g, tensors = packed
        return PackedLinear(fmt, shape[1], shape[0], g, tensors)
    linear = nn.Linear(shape[1], shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(_float(path, name, kind, shape, data), requires_grad=False)
    return linear


def load_gguf_packed(path: str | Path, tokenizer: bool = True) -> tuple[Transformer, Checkpoint]:
    """A model built from a GGUF file with its tensors kept as stored (see the module docstring),
    and the file's Checkpoint (config, tokenizer, chat template, end tokens; its state_dict is the
    model's)."""
    f = GGUFFile(path)
    path, md, tensors = f.path, f.metadata, dict(f.tensors)
    if "token_embd.weight" not in tensors:
        raise HerdError(f"{path}: no token_embd.weight tensor")
    rope = tensors.pop("rope_freqs.weight", None)
    factors = None if rope is None else rope[2].view(np.float32).copy()
    emb_shape, emb_kind, emb_data = tensors["token_embd.weight"]
    cfg = config_from_gguf(path, md, emb_shape[0], factors)
    names = gguf_names(cfg.n_layers)
    unknown = [n for n in tensors if n not in names]
    if unknown:
        raise HerdError(f"{path}: unexpected tensor {unknown[0]} for a {cfg.n_layers}-layer Llama")
    out = tensors.get("output.weight")
    tied = out is None or (out[1] == emb_kind and out[0] == emb_shape and np.array_equal(out[2], emb_data))
    cfg = with_family(cfg.replace(tie_embeddings=tied))

    with torch.device("meta"):
        model = Transformer(cfg)
    floats = {}
    for gname, (shape, kind, data) in tensors.items():
        name = names[gname]
        if name.endswith("norm.weight"):
            floats[name] = _float(path, gname, kind, shape, data)
            continue
        if name == "tok_embeddings.weight" or (name == "output.weight" and tied):
            continue
        if len(shape) != 2:
            raise HerdError(f"{path}: tensor {gname} has shape {list(shape)}, expected a matrix")
        parent, _, attr = name.removesuffix(".weight").rpartition(".")
        setattr(model.get_submodule(parent), attr, _module(path, gname, kind, shape, data))

    embedding = _module(path, "token_embd.weight", emb_kind, emb_shape, emb_data)
    if tied:
        model.output = embedding
    if isinstance(embedding, PackedLinear):
        model.tok_embeddings = PackedEmbedding(embedding)
    else:
        floats["tok_embeddings.weight"] = embedding.weight
    missing = [n for n in floats if n not in dict(model.named_parameters())]
    if missing:
        raise HerdError(f"{path}: unexpected tensor {missing[0]}")
    model.load_state_dict(floats, strict=False, assign=True)
    if tied and isinstance(model.output, nn.Linear):
        model.output.weight = model.tok_embeddings.weight
    _check_shapes(path, model)
    tok, template, eos = gguf_extras(md, tokenizer)
    return model, Checkpoint(cfg, model.state_dict(), "gguf", path, tok, template, eos)


def _check_shapes(path: Path, model: Transformer) -> None:
    """Every tensor present, every matrix of the size the config needs."""
    expected = expected_shapes(model.config)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise HerdError(f"{path}: tensor {name} is missing")
    for name, module in model.named_modules():
        if isinstance(module, (PackedLinear, nn.Linear)) and f"{name}.weight" in expected:
            shape = (module.out_features, module.in_features)
            if shape != expected[f"{name}.weight"]:
                raise HerdError(f"{path}: tensor {name}.weight has shape {list(shape)}, "
                                f"the config needs {list(expected[name + '.weight'])}")
