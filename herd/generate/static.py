"""Greedy decoding with static shapes, so that a GPU replays one recorded step per token.

An eager decode step on a GPU is bound by kernel launches (several microseconds each from Python)
and by the host waiting on the device, not by memory bandwidth. Here every step has the same
shapes: a fixed batch bucket, a cache of fixed length attended in full under a mask, and tokens and
positions held in device tensors that the step itself advances. Nothing in a step reads a value
back to the host, so on CUDA the step is recorded once as a CUDA graph and replayed; on the CPU the
same step runs as it is, which is how it is tested.
"""

from __future__ import annotations

import torch

from herd.errors import HerdError
from herd.model import Transformer

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket_for(rows: int) -> int:
    """The smallest batch bucket that holds `rows` rows (extra rows are padding)."""
    for b in BUCKETS:
        if b >= rows:
            return b
    raise HerdError(f"{rows} rows is more than the largest batch bucket ({BUCKETS[-1]})")


class StaticDecoder:
    """Greedy decoding of up to `bucket` rows in a cache of `max_seq_len` positions.

    `capture`: record the step as a CUDA graph (default: on CUDA). `compile`: fuse the step's
    kernels with torch.compile before recording it.
    """

    def __init__(self, model: Transformer, rows: int, max_seq_len: int, capture: bool | None = None,
                 compile: bool = False):
        self.model = model
        self.batch = bucket_for(rows)
        self.cache = model.new_cache(self.batch, max_seq_len)
        device = model.device
        self.tokens = torch.zeros(self.batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(self.batch, 1, dtype=torch.long, device=device)
        self.capture = device.type == "cuda" if capture is None else capture
        self.run = torch.compile(self._step, dynamic=False) if compile else self._step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.next_position = 0  # the host's copy of the largest position, for the bound check

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Fill the cache with the prompts (one per row, at most `bucket` of them); return each
        row's first generated token [rows]."""
        if not 0 < len(prompts) <= self.batch or min(map(len, prompts)) < 1:
            raise HerdError(f"give 1 to {self.batch} prompts of at least one token each")
        width = max(map(len, prompts))
        if width >= self.cache.max_seq_len:
            raise HerdError(f"a prompt of {width} tokens leaves no room in a cache of {self.cache.max_seq_len}")
        ids = torch.zeros(self.batch, width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p)
        lens = torch.tensor([len(p) for p in prompts] + [1] * (self.batch - len(prompts)))
        device = self.tokens.device
        # Slots past a row's prompt get the padding's keys; each is overwritten before it is attended.
        logits = self.model(ids.to(device), torch.arange(width, device=device), self.cache,
                            logits_at=(lens - 1).to(device))
        self.tokens.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.positions.copy_(lens.unsqueeze(1))
        self.next_position = width
        return self.tokens[:len(prompts), 0].clone()

    def _step(self) -> None:
        logits = self.model(self.tokens, self.positions, self.cache, static=True)
        self.tokens.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.positions.add_(1)

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """Advance every row by one token; return the new tokens [bucket] (still on the device)."""
        if self.next_position >= self.cache.max_seq_len:
            raise HerdError(f"the cache of {self.cache.max_seq_len} positions is full")
        if not self.capture:
            self.run()
        else:
            if self.graph is None:
                self.graph = self._record()
            self.graph.replay()
        self.next_position += 1
        return self.tokens[:, 0].clone()

    def _record(self) -> torch.cuda.CUDAGraph:
        """Record the step. Warm-up runs (allocations, cuBLAS and compile) happen on a side stream
        and are undone: they rewrite the cache slot the real step will write anyway."""
        saved = self.tokens.clone(), self.positions.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.run()
                self.tokens.copy_(saved[0])
                self.positions.copy_(saved[1])
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.run()
        return graph


def greedy(model: Transformer, prompts: list[list[int]], new_tokens: int, capture: bool | None = None,
           compile: bool = False) -> list[list[int]]:
    """`new_tokens` greedy tokens after each prompt, decoded with static shapes; the tokens come
    back to the host once, at the end."""
    decoder = StaticDecoder(model, len(prompts), max(map(len, prompts)) + new_tokens, capture, compile)
    out = [decoder.prefill(prompts)]
    out += [decoder.step()[:len(prompts)] for _ in range(new_tokens - 1)]
    return torch.stack(out, dim=1).tolist()
