"""The engine's KV cache: one row ("slot") per running request, and a view that maps the rows of
a forward pass onto slots.

Per-slot rather than paged: on the CPU, attention reads a slot's keys and values as one
contiguous tensor, where paged blocks would have to be gathered (copied) at every step; the cost
is that each slot reserves the whole context. A slot keeps the prompt it last prefilled, so a
new prompt that starts the same way (a chat resending its history) skips that part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from herd.model import KVCache


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
