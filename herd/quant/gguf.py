"""GGUF's quantized blocks repacked into herd's packed formats (no dequantization):

    Q8_0 -> q8, group 32, fp16 scales      Q4_0 -> q4, group 32, symmetric
    Q4_1 -> q4, group 32, fp16 scales      Q4_K -> q4, group 32, fp32 scales (d * sc, -dmin * m)
    Q6_K -> q8, group 16, fp32 scales      F16, BF16 -> f16, bf16
Loading a GGUF file this way is herd.checkpoint.gguf_packed's.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import Q4_K

T = GGMLQuantizationType


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
