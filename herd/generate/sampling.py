"""Sampling settings and the per-sequence sampler that turns logits into the next token."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from herd.errors import HerdError


@dataclass
class SamplingParams:
    """How one sequence is generated. Temperature 0 means greedy decoding."""

    max_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # CTRL-style, over prompt and output; 1: off
    presence_penalty: float = 0.0  # OpenAI-style, over the output
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings, never part of the output
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the model's end tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    json_schema: dict | None = None  # output constrained to JSON matching this schema

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = dict(self.logit_bias or {})
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"max_tokens must be a positive integer, got {self.max_tokens!r}"),
            (_finite(self.temperature) and self.temperature >= 0, f"temperature must be >= 0, got {self.temperature!r}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k!r}"),
            (_finite(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}"),
            (_finite(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}"),
            (_finite(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty!r}"),
            (_finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}"),
            (_finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}"),
            (self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (all(isinstance(t, int) for t in self.stop_token_ids), "stop_token_ids must be integers"),
            (all(isinstance(t, int) and t >= 0 and _finite(b) and -100 <= b <= 100 for t, b in self.logit_bias.items()),
             "logit_bias must map token ids >= 0 to biases in [-100, 100]"),
            (self.json_schema is None or isinstance(self.json_schema, dict), "json_schema must be a dict"),
        ]
        for ok, message in checks:
            if not ok:
                raise HerdError(message)


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """A token drawn from `probs` (non-negative weights of any sum): the cumulative sum inverted at
    a uniform draw. torch.multinomial takes ~1.5 ms for one draw over a 49K vocabulary here (16
    rows of a serving step spent 23 ms in it), this ~0.1 ms."""
    cdf = probs.double().cumsum(0)
    u = torch.rand(1, generator=generator, dtype=torch.float64) * cdf[-1]
    return int(torch.searchsorted(cdf, u, right=True)[0].clamp(max=probs.numel() - 1))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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
