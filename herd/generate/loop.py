"""The decoding loop: prefill every prompt of a batch, then decode one token per step with the
KV cache until each sequence has ended."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from herd.generate.sequence import Sequence
from herd.model import Transformer


@torch.inference_mode()
def run_batch(model: Transformer, seqs: list[Sequence], prefill_chunk: int = 512) -> Iterator[list[tuple[int, str]]]:
    """Generate all `seqs` together; after each step yield (index, new text) for every sequence
    that advanced. Rows sit at their own positions, so a prompt's output does not depend on the
    other prompts in the batch."""
    device = model.device
    lens = torch.tensor([len(s.prompt_ids) for s in seqs])
    cache = model.new_cache(len(seqs), max(len(s.prompt_ids) + s.limit for s in seqs))
    width = int(lens.max())
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s.prompt_ids)] = torch.tensor(s.prompt_ids)
    tokens = tokens.to(device)

    # Prefill in chunks; keep each row's logits at its last prompt token.
    last = lens - 1
    logits = None
    for start in range(0, width, prefill_chunk):
        end = min(start + prefill_chunk, width)
        at = (last - start).clamp(0, end - start - 1)
        chunk_logits = model(tokens[:, start:end], torch.arange(start, end, device=device), cache,
                             logits_at=at.to(device))[:, 0].float().cpu()
        here = (last >= start) & (last < end)
        logits = chunk_logits if logits is None else torch.where(here.unsqueeze(1), chunk_logits, logits)

    while True:
        events = []
        for i, s in enumerate(seqs):
            if not s.finished:
                events.append((i, s.append(s.next_token(logits[i]))))
        yield events
        if all(s.finished for s in seqs):
            return
        next_tokens = torch.tensor([[s.output_ids[-1] if not s.finished else 0] for s in seqs], device=device)
        positions = torch.tensor([[len(s.prompt_ids) + len(s.output_ids) - 1 if not s.finished else 0]
                                  for s in seqs], device=device)
        logits = model(next_tokens, positions, cache)[:, 0].float().cpu()
