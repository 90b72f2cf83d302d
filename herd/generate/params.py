"""`SamplingParams`: how one sequence is generated. Kept free of torch, so that the command line
builds its sampling flags from these fields (names, defaults, help) without importing it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from herd.errors import HerdError


def flag(help: str, short: str | None = None, **kw) -> Any:
    """A field (`kw` as dataclasses.field takes) that is also the command-line flag --NAME (and
    `short`), with this help."""
    return field(metadata={"help": help, "short": short}, **kw)


@dataclass
class SamplingParams:
    """How one sequence is generated. Temperature 0 means greedy decoding."""

    max_tokens: int = flag("most tokens to generate", "-n", default=256)
    temperature: float = flag("0 is greedy", "-t", default=0.8)
    top_k: int = flag("keep the k likeliest tokens; 0: off", default=0)
    top_p: float = flag("nucleus sampling mass; 1: off", default=1.0)
    min_p: float = flag("drop tokens below min-p x the top probability; 0: off", default=0.0)
    repetition_penalty: float = flag("CTRL-style, over prompt and output; 1: off", default=1.0)
    presence_penalty: float = flag("OpenAI-style, over the output", default=0.0)
    frequency_penalty: float = flag("OpenAI-style, by count over the output", default=0.0)
    seed: int | None = flag("same seed, same output", default=None)
    stop: list[str] = flag("stop string, never part of the output", default_factory=list)
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


def make_params(options: dict) -> SamplingParams:
    """SamplingParams from keyword options, refusing a name that is not a field (torch-free: the
    command line checks its options with it before loading anything)."""
    unknown = set(options) - {f.name for f in dataclasses.fields(SamplingParams)}
    if unknown:
        raise HerdError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
    return SamplingParams(**options)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
