"""Perplexity of a text with a sliding window: every token (after the first) is predicted exactly
once, from up to `context` tokens before it; windows start `stride` tokens apart, so each
prediction sees at least context - stride tokens of history (stride == context: disjoint
windows, the way llama2.c measures validation loss)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from herd.errors import HerdError
from herd.eval.scoring import token_logprobs
from herd.model import Transformer


@dataclass
class Perplexity:
    nll: float  # summed negative log-likelihood, nats
    tokens: int  # tokens predicted
    bytes: int | None = None  # UTF-8 bytes of the text, when known

    @property
    def nats_per_token(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token)

    @property
    def bits_per_byte(self) -> float | None:
        """Tokenizer-independent: comparable across vocabularies."""
        return None if not self.bytes else self.nll / math.log(2) / self.bytes


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, scored) per window: the window feeds ids[start:end] to predict
    ids[start+1:end+1], of which the last `scored` are new."""
    if not 1 <= stride <= context:
        raise HerdError(f"stride must be between 1 and the context ({context}), got {stride}")
    out, done, start = [], 0, 0  # done: ids[1..done] are predicted
    while done < n_tokens - 1:
        end = min(start + context, n_tokens - 1)
        out.append((start, end, end - done))
        done, start = end, start + stride
    return out


def perplexity(model: Transformer, ids: list[int], context: int | None = None, stride: int | None = None,
               batch_size: int = 8, n_bytes: int | None = None, progress: bool = False) -> Perplexity:
    """Perplexity of the token ids (BOS included if the model expects one). `context` defaults
    to the model's, `stride` to half of `context`; `progress` shows a bar of windows on stderr."""
    context = context or model.config.max_seq_len
    if not 1 <= context <= model.config.max_seq_len:
        raise HerdError(f"context must be between 1 and the model's {model.config.max_seq_len}, got {context}")
    stride = stride or max(1, context // 2)
    if len(ids) < 2:
        raise HerdError("perplexity needs at least two tokens")
    spans = windows(len(ids), context, stride)
    nll = 0.0
    for lp, _ in token_logprobs(model, [(ids[s:e + 1], n) for s, e, n in spans], batch_size,
                                "perplexity" if progress else None):
        nll -= float(lp.sum())
    return Perplexity(nll, len(ids) - 1, n_bytes)
