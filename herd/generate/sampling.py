"""The per-sequence sampler that turns logits into the next token (its settings are
herd.generate.params.SamplingParams)."""

from __future__ import annotations

import math

import torch

from herd.errors import HerdError
from herd.generate.params import SamplingParams


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """A token drawn from `probs` (non-negative weights of any sum): the cumulative sum inverted at
    a uniform draw. torch.multinomial takes ~1.5 ms for one draw over a 49K vocabulary here (16
    rows of a serving step spent 23 ms in it), this ~0.1 ms."""
    cdf = probs.double().cumsum(0)
    u = torch.rand(1, generator=generator, dtype=torch.float64) * cdf[-1]
    return int(torch.searchsorted(cdf, u, right=True)[0].clamp(max=probs.numel() - 1))


class Sampler:
    """Picks the next token of one sequence. Owns the sequence's random generator, so the same
    seed gives the same output whatever else runs in the batch."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int):
        self.params = params
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        self.generator = torch.Generator().manual_seed(seed)
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            self.seen[torch.tensor(prompt_ids, dtype=torch.long)] = True
        self.counts = None
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab_size)
        self.bias = None
        if params.logit_bias:
            if max(params.logit_bias) >= vocab_size:
                raise HerdError(f"logit_bias: token id {max(params.logit_bias)} is outside the vocabulary of {vocab_size}")
            self.bias = torch.zeros(vocab_size)
            self.bias[list(params.logit_bias)] = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)

    def __call__(self, logits: torch.Tensor) -> int:
        """Next token for logits [vocab] (any device/dtype)."""
        probs = self.probs(logits)
        return int(probs.argmax()) if self.params.temperature == 0 else draw(probs, self.generator)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution the next token is drawn from: logits after the penalties, temperature,
        top-k, top-p and min-p (one-hot on the best token when greedy)."""
        p = self.params
        logits = logits.float().cpu()
        if self.bias is not None:
            logits = logits + self.bias
        if self.seen is not None:
            penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, penalised, logits)
        if self.counts is not None:
            logits = logits - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0)
        if p.temperature == 0:
            return torch.zeros_like(logits).index_fill_(0, logits.argmax().view(1), 1.0)
        # In float64 and shifted so that the largest is 0: a tiny temperature then sends the
        # others to -inf instead of overflowing (or rounding the temperature to 0 in float32).
        logits = (logits.double() - logits.max()) / p.temperature
        if p.top_k and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, -math.inf)
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # drop a token when the tokens before it already reach top_p (the first always stays)
            drop = (sorted_probs.cumsum(0) - sorted_probs) >= p.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        return probs

    def update(self, token: int) -> None:
        """Record an accepted output token for the penalties."""
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1
