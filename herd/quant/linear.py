"""Packed weights: `PackedLinear` and `PackedEmbedding` replace `nn.Linear` / `nn.Embedding` in a
built Transformer (module swap: the model code does not change).

A packed weight stays in its storage format (16-bit, int8 or int4) and is expanded only inside the
kernels, so decoding streams 2, 1 or ~0.6 bytes per weight instead of 4. Formats:

    f32, f16, bf16  `weight` [N, K] in that dtype
    q8              `qweight` int8 [N, K]; `scales` [N, K / g]: w = q * s
    q4              `qweight` uint8 [N, K / 2]; `scales`, `mins` [N, K / g]: w = q * s + m, q in 0..15
                    (without `mins`, symmetric: w = (q - 8) * s, as GGUF's Q4_0);
                    each pair of 32-input blocks is 32 bytes, byte t holding input t of the first
                    block (low nibble) and of the second (high nibble)

Scales are fp16 (herd's own quantization, GGUF Q8_0/Q4_0/Q4_1) or fp32 (GGUF Q4_K/Q6_K, whose
scales are products that fp16 cannot hold exactly). Activations are fp32.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from herd.quant import native

FORMATS = ("f32", "f16", "bf16", "q8", "q4")
# the dtype of each unquantized format
FLOAT_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# Up to this many tokens per call the weight-streaming kernel wins for fp32 and 16-bit weights
# (herd_linear: each weight is read once per 4 tokens); beyond, the blocked fp32 matrix multiply does
# (herd_matmul). Measured on 2 Zen 3 cores, 5632 x 2048: they cross near 24 tokens. int8 and int4
# weights take herd_linear for any number of tokens: int8 activations times int8/int4 weights, the
# arithmetic of llama.cpp, so a prompt's tokens are computed as decoded ones are.
MV_MAX_TOKENS = {"f32": 16, "f16": 16, "bf16": 16}


def kernel_ok(fmt: str, in_features: int, group_size: int | None) -> bool:
    """Whether the C kernels take this shape (everything else uses the torch fallback)."""
    if fmt in FLOAT_DTYPES:
        return in_features % 16 == 0
    if fmt == "q8":
        return in_features % 32 == 0 and (group_size == 16 or group_size % 32 == 0)
    return in_features % 64 == 0 and group_size % 32 == 0


def unpack_q4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 2] in the q4 layout -> values 0..15 as uint8 [N, K]."""
    pairs = qweight.reshape(qweight.shape[0], -1, 1, 32)
    return torch.cat((pairs & 15, pairs >> 4), dim=2).reshape(qweight.shape[0], -1)


def pack_q4(values: torch.Tensor) -> torch.Tensor:
    """values 0..15 [N, K] (K a multiple of 64) -> uint8 [N, K / 2] in the q4 layout."""
    pairs = values.to(torch.uint8).reshape(values.shape[0], -1, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(values.shape[0], -1)


def _expand(per_group: torch.Tensor, group_size: int) -> torch.Tensor:
    return per_group.float().repeat_interleave(group_size, dim=-1)


def dequantize(fmt: str, group_size: int | None, packed: dict[str, torch.Tensor],
               rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
    """Rows of a packed weight as fp32."""
    if fmt in FLOAT_DTYPES:
        return packed["weight"][rows].float()
    scales = _expand(packed["scales"][rows], group_size)
    if fmt == "q8":
        return packed["qweight"][rows].float() * scales
    q = unpack_q4(packed["qweight"][rows]).float()
    if "mins" not in packed:
        return (q - 8) * scales
    return q * scales + _expand(packed["mins"][rows], group_size)


class PackedLinear(nn.Module):
    """y = x W^T with W kept packed; see the module docstring for the formats."""

    def __init__(self, fmt: str, in_features: int, out_features: int, group_size: int | None = None,
                 tensors: dict[str, torch.Tensor] | None = None):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"unknown packed format {fmt!r}")
        self.fmt, self.in_features, self.out_features = fmt, in_features, out_features
        self.group_size = group_size if fmt in ("q8", "q4") else None
        for name, t in (tensors or {}).items():
            self.register_buffer(name, t)
        self.kernel_ok = kernel_ok(fmt, in_features, self.group_size)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return f"{self.fmt}, in_features={self.in_features}, out_features={self.out_features}{g}"

    def packed(self) -> dict[str, torch.Tensor]:
        return {name: buf for name, buf in self.named_buffers(recurse=False)}

    def dequantize(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """The weight (or some of its rows) as fp32, in torch: the reference the kernels are tested
        against, and the path on devices without kernels."""
        return dequantize(self.fmt, self.group_size, self.packed(), rows)

    def describe(self) -> native.Linear:
        """This layer for the C kernels (valid while its buffers are)."""
        s, m = getattr(self, "scales", None), getattr(self, "mins", None)
        w = self.weight if self.fmt in FLOAT_DTYPES else self.qweight
        return native.Linear(native.FORMAT_CODES[self.fmt], int(s is not None and s.dtype == torch.float16),
                             self.group_size or 0, self.out_features, self.in_features, w.data_ptr(),
                             None if s is None else s.data_ptr(), None if m is None else m.data_ptr())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lib = native.library() if self.kernel_ok and x.device.type == "cpu" else None
        if lib is None:
            return F.linear(x.float(), self.dequantize())
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        kernel = lib.herd_matmul if x2.shape[0] > MV_MAX_TOKENS.get(self.fmt, x2.shape[0]) else lib.herd_linear
        y = torch.empty(x2.shape[0], self.out_features)
        kernel(ctypes.byref(self.describe()), x2.data_ptr(), x2.shape[0], y.data_ptr(), native.threads())
        return y.view(*x.shape[:-1], self.out_features)


class PackedEmbedding(nn.Module):
    """Token embedding read from a packed matrix (shared with the output layer when tied)."""

    def __init__(self, linear: PackedLinear):
        super().__init__()
        self.fmt, self.group_size = linear.fmt, linear.group_size
        self.num_embeddings, self.embedding_dim = linear.out_features, linear.in_features
        for name, buf in linear.packed().items():
            self.register_buffer(name, buf)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return dequantize(self.fmt, self.group_size, self.packed(), tokens.reshape(-1)).view(*tokens.shape, -1)

    def packed(self) -> dict[str, torch.Tensor]:
        return {name: buf for name, buf in self.named_buffers(recurse=False)}
