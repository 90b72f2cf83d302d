"""A preallocated key/value cache: one buffer for all layers, written at each token's position."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KVCache(nn.Module):
    """Keys and values of shape [layers, batch, kv_heads, max_seq_len, head_dim].

    Positions are slots: a token at position p is stored in slot p of its row, so rewinding
    (speculative decoding, a shared prompt prefix) is just writing again from an earlier position.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        shape = (n_layers, batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, kv_heads, T, D] at positions input_pos [B, T]; return the first
        `kv_len` slots of this layer's keys and values."""
        k_cache, v_cache = self.k[layer], self.v[layer]
        rows = torch.arange(k.shape[0], device=k.device).unsqueeze(1)
        k_cache[rows, :, input_pos] = k.transpose(1, 2).to(k_cache.dtype)
        v_cache[rows, :, input_pos] = v.transpose(1, 2).to(v_cache.dtype)
        return k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]

    def attend(self, layer: int, input_pos: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """Store k, v and attend q [B, heads, T, D] over this layer's cache under `mask`
        [B, 1, T, kv_len]. A subclass may attend differently (the serving engine attends row by
        row so that a row's result does not depend on its neighbours)."""
        k, v = self.update(layer, input_pos, k, v, mask.shape[-1])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
