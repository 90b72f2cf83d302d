"""A preallocated key/value cache: one buffer for all layers, written at each token's position;
and the serving engine's form of it: one row ("slot") per running request, and a view that maps the
rows of a forward pass onto slots.

Per-slot rather than paged: on the CPU, attention reads a slot's keys and values as one
contiguous tensor, where paged blocks would have to be gathered (copied) at every step; the cost
is that each slot reserves the whole context. A slot keeps the prompt it last prefilled, so a
new prompt that starts the same way (a chat resending its history) skips that part.
"""

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


class SlotCache(KVCache):
    """KV cache of `n_slots` rows of `ctx` positions each."""

    def rows(self, slots: list[int], n_real: int | None = None) -> SlotRows:
        return SlotRows(self, slots, len(slots) if n_real is None else n_real)


class SlotRows:
    """The cache as seen by one forward pass: batch row i is slot `slots[i]`.

    Rows past `n_real` are padding (copies of the last real row, see Engine) and write nothing.
    A decode step (one token per row) attends row by row over exactly that row's positions, so
    a row's result never depends on how many rows run beside it or how long they are.
    """

    def __init__(self, cache: SlotCache, slots: list[int], n_real: int):
        self.cache = cache
        self.slots = slots
        self.n_real = n_real
        self.index = torch.tensor(slots[:n_real], device=cache.k.device)

    @property
    def max_seq_len(self) -> int:
        return self.cache.max_seq_len

    def attend(self, layer: int, input_pos: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        n = self.n_real
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        pos = input_pos[:n]
        k_cache[self.index.unsqueeze(1), :, pos] = k[:n].transpose(1, 2).to(k_cache.dtype)
        v_cache[self.index.unsqueeze(1), :, pos] = v[:n].transpose(1, 2).to(v_cache.dtype)
        gqa = k.shape[1] != q.shape[1]
        if q.shape[2] > 1:  # a prefill chunk: one row, causal within the chunk
            kv_len = mask.shape[-1]
            s = self.slots[0]
            return F.scaled_dot_product_attention(q, k_cache[s : s + 1, :, :kv_len], v_cache[s : s + 1, :, :kv_len],
                                                  attn_mask=mask, enable_gqa=gqa)
        ends = (pos[:, 0] + 1).tolist()
        out = [F.scaled_dot_product_attention(q[i : i + 1], k_cache[s : s + 1, :, :end], v_cache[s : s + 1, :, :end],
                                              enable_gqa=gqa)
               for i, (s, end) in enumerate(zip(self.slots, ends))]
        out += out[-1:] * (q.shape[0] - n)
        return torch.cat(out)
