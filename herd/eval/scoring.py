"""Log-likelihoods of token sequences under a model: the primitive every evaluation uses.

Sequences are sorted by length and run in right-padded batches without a KV cache (plain causal
attention, so padding never reaches a real token).
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from herd.errors import HerdError
from herd.model import Transformer


@torch.inference_mode()
def token_logprobs(model: Transformer, sequences: list[tuple[list[int], int]], batch_size: int = 8,
                   progress: str | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each (ids, n): the log-probabilities [n] of the last n tokens of ids, each given the
    tokens before it, and whether each was the model's top choice [n]. `progress`: a bar with this
    label on stderr, counting sequences."""
    device = model.device
    out: list = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
    bar = tqdm(total=len(sequences), desc=progress, unit="window", disable=progress is None)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = len(sequences[batch[0]][0]) - 1
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        for j, i in enumerate(batch):
            ids = sequences[i][0]
            inputs[j, :len(ids) - 1] = torch.tensor(ids[:-1])
        logits = model(inputs.to(device))
        for j, i in enumerate(batch):
            ids, n = sequences[i]
            logp = torch.log_softmax(logits[j, len(ids) - 1 - n:len(ids) - 1].float(), dim=-1).cpu()
            target = torch.tensor(ids[-n:])
            out[i] = (logp.gather(1, target[:, None]).squeeze(1), logp.argmax(-1) == target)
        bar.update(len(batch))
    bar.close()
    return out


def score(model: Transformer, requests: list[tuple[list[int], list[int]]], batch_size: int = 8,
          max_len: int | None = None) -> list[tuple[float, bool]]:
    """(log P(continuation | context), whether greedy decoding yields the continuation) for each
    (context ids, continuation ids). A request longer than `max_len` (default: the model's
    context) keeps its last tokens; the continuation itself must fit."""
    max_len = max_len or model.config.max_seq_len
    sequences = []
    for i, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise HerdError(f"scoring request {i}: context and continuation must be non-empty (start with BOS)")
        if len(continuation) > max_len:
            raise HerdError(f"scoring request {i}: continuation of {len(continuation)} tokens exceeds the "
                            f"{max_len}-token context")
        sequences.append(((context + continuation)[-(max_len + 1):], len(continuation)))
    return [(float(lp.sum()), bool(top.all())) for lp, top in token_logprobs(model, sequences, batch_size)]
