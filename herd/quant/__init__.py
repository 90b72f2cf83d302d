"""Fast inference on packed weights: int8 / int4 weight-only quantization and 16-bit weights by
module swap, with C kernels that read each weight once per decode step (NF4 for QLoRA: nf4.py)."""

from herd.quant.linear import PackedEmbedding, PackedLinear
from herd.quant.quantize import pack_weight, quantize

__all__ = ["PackedEmbedding", "PackedLinear", "pack_weight", "quantize"]
