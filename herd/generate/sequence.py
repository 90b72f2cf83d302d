"""One sequence being generated: its sampler, its output tokens and text, and why it ended."""

from __future__ import annotations

import torch

from herd.errors import HerdError
from herd.generate.constrained import JsonConstraint
from herd.generate.params import SamplingParams
from herd.generate.sampling import Sampler
from herd.generate.stopping import StopStrings
from herd.tokenizer import StreamDecoder, Tokenizer


class Sequence:
    """Token-level and text-level state of one generation.

    `limit` is the number of tokens it may still produce: max_tokens, or less where the
    model's context ends first. Without a tokenizer only token ids are produced (benchmarks,
    scoring).
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer | None,
                 stop_ids: set[int], vocab_size: int, limit: int):
        if not prompt_ids:
            raise HerdError("the prompt is empty: generation needs at least one token to start from")
        self.prompt_ids = prompt_ids
        self.params = params
        self.limit = limit
        self.sampler = Sampler(params, prompt_ids, vocab_size)
        self.stop_ids = set(stop_ids) | set(params.stop_token_ids)
        self.decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
        self.stops = StopStrings(params.stop)
        self.output_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None  # "stop" | "length"
        self.constraint = None
        if params.json_schema is not None:
            if tokenizer is None:
                raise HerdError("json_schema needs a tokenizer")
            self.constraint = JsonConstraint(tokenizer, params.json_schema)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def next_token(self, logits: torch.Tensor) -> int:
        """Sample the next token from logits [vocab], within the constraint if there is one."""
        return self.sampler(self.constrain(logits))

    def constrain(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [vocab] with the tokens the constraint forbids next set to -inf (as they are
        without a constraint)."""
        if self.constraint is None:
            return logits
        return logits.float().masked_fill(~self.constraint.allowed(logits.shape[-1]), -torch.inf)

    def append(self, token: int) -> str:
        """Take the next token; return the text it makes final (may be empty)."""
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return self._emit(self._flush())
        self.output_ids.append(token)
        self.sampler.update(token)
        if self.constraint is not None:
            self.constraint.accept(token)
        text, hit = self.stops.feed(self.decoder.push(token) if self.decoder else "")
        if hit:
            self.finish_reason = "stop"
            return self._emit(text)
        if len(self.output_ids) >= self.limit:
            self.finish_reason = "length"
            text += self._flush()
        return self._emit(text)

    def _flush(self) -> str:
        text, hit = self.stops.feed(self.decoder.flush() if self.decoder else "")
        return text if hit else text + self.stops.flush()

    def _emit(self, text: str) -> str:
        self.text += text
        return text
