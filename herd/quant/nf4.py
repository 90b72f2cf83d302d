"""4-bit NormalFloat (NF4), the data type of QLoRA (Dettmers et al. 2023): each block of 64
weights keeps its absolute maximum in fp32, and every weight divided by it is rounded to the
nearest of 16 levels placed at quantiles of a standard normal distribution. Two codes per byte,
the first in the high nibble, as bitsandbytes stores them: 4.5 bits per weight.

`NF4Linear` holds a frozen weight that way and dequantizes it one layer at a time in forward
and backward, so a QLoRA base costs a quarter of its 16-bit size between steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from herd.errors import HerdError

# The 16 NF4 levels: 7 negative and 8 positive normal quantiles scaled to [-1, 1], and an exact 0.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
# byte -> (level of the high nibble, level of the low nibble): one lookup per byte dequantizes two weights
_PAIRS = torch.stack((NF4_LEVELS.repeat_interleave(16), NF4_LEVELS.repeat(16)), dim=1)


def quantize_nf4(weight: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax): `codes` is uint8 [numel / 2], two 4-bit level indices per byte;
    `absmax` is fp32 [numel / block_size]. numel must be a multiple of block_size."""
    if weight.numel() % block_size or block_size % 2:
        raise HerdError(f"NF4: {weight.numel()} weights do not split into blocks of {block_size}")
    blocks = weight.detach().float().reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    idx = torch.bucketize(scaled, _MIDPOINTS.to(scaled.device)).to(torch.uint8).reshape(-1)
    return (idx[0::2] << 4) | idx[1::2], absmax


def dequantize_nf4(codes: torch.Tensor, absmax: torch.Tensor, shape: torch.Size | tuple[int, ...],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight of `shape` that `quantize_nf4` encoded, in `dtype`."""
    values = F.embedding(codes.int(), _PAIRS.to(codes.device)).view(absmax.shape[0], -1)
    return values.mul_(absmax.unsqueeze(1)).view(shape).to(dtype)


class _NF4Matmul(torch.autograd.Function):
    """x @ W.T with W dequantized on the fly; W is frozen, so backward needs neither x nor a
    stored W: it dequantizes again for the input gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        layer = ctx.layer
        grad_x = grad.new_zeros(*grad.shape[:-1], layer.in_features)
        for r0, r1 in layer.row_chunks():
            grad_x += grad[..., r0:r1] @ layer.dequantize_rows(r0, r1, grad.dtype)
        return grad_x, None


class NF4Linear(nn.Module):
    """A bias-free linear layer whose frozen weight is stored in NF4. The weight is dequantized
    a slice of rows (about a million weights) at a time, so a layer never holds more than that
    in full precision, whatever its size."""

    chunk = 1 << 20  # weights dequantized at once

    def __init__(self, codes: torch.Tensor, absmax: torch.Tensor, out_features: int, in_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block_size = codes.numel() * 2 // absmax.numel()
        self.register_buffer("codes", codes)
        self.register_buffer("absmax", absmax)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64) -> NF4Linear:
        if linear.bias is not None:
            raise HerdError("NF4Linear: layers with a bias are not supported")
        codes, absmax = quantize_nf4(linear.weight, block_size)
        return cls(codes, absmax, linear.out_features, linear.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nf4(self.codes, self.absmax, (self.out_features, self.in_features), dtype)

    def row_chunks(self) -> list[tuple[int, int]]:
        """Row ranges of about `chunk` weights, each a whole number of quantization blocks."""
        align = self.block_size // math.gcd(self.in_features, self.block_size)
        rows = max(align, self.chunk // self.in_features // align * align)
        return [(r, min(r + rows, self.out_features)) for r in range(0, self.out_features, rows)]

    def dequantize_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        a, b = r0 * self.in_features, r1 * self.in_features
        return dequantize_nf4(self.codes[a // 2 : b // 2], self.absmax[a // self.block_size : -(-b // self.block_size)],
                              (r1 - r0, self.in_features), dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for r0, r1 in self.row_chunks():
            out[..., r0:r1] = F.linear(x, self.dequantize_rows(r0, r1, x.dtype))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _NF4Matmul.apply(x, self)
        return self.matmul(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"


def quantize_linears_nf4(model: nn.Module, skip: tuple[str, ...] = ("output",), block_size: int = 64) -> nn.Module:
    """Replace every nn.Linear of `model` (except the names in `skip`, e.g. a classifier tied to
    the embedding) by an NF4Linear, in place; the full-precision weights are freed."""
    targets = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in skip]
    for name in targets:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, NF4Linear.from_linear(getattr(owner, child), block_size))
    return model
