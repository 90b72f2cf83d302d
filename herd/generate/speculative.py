"""Speculative decoding: a cheap drafter proposes the next k tokens, the model checks them all in one
forward pass, and every proposal it agrees with is a token gained for the price of one step.

Drafters: `PromptLookup` copies what followed the latest earlier occurrence of the text's last
n-gram (code edits, quoting, summaries repeat their input); `DraftModel` runs a smaller model with
the same tokenizer. Acceptance is the rule of Leviathan et al. / Chen et al. (2023): a proposal d
drawn from q is kept with probability min(1, p(d) / q(d)) and otherwise the token is drawn from
norm(max(0, p - q)), which leaves every output token distributed exactly as p. At temperature 0 p is
one-hot, so the output is token for token the greedy output (the model's decode steps compute each
token the same way whatever else is in the step; see herd.quant.forward).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from herd.errors import HerdError
from herd.generate.sampling import draw
from herd.generate.sequence import Sequence
from herd.model import KVCache, Transformer


class PromptLookup:
    """Drafts by n-gram lookup in the text so far (prompt and output)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def draft(self, context: list[int], k: int, sampler=None) -> tuple[list[int], list[torch.Tensor | None]]:
        n_ctx = len(context)
        for n in range(min(self.max_ngram, n_ctx - 1), self.min_ngram - 1, -1):
            tail = context[-n:]
            for start in range(n_ctx - n - 1, -1, -1):  # the latest earlier occurrence first
                if context[start:start + n] == tail:
                    found = context[start + n:start + n + k]
                    return found, [None] * len(found)
        return [], []

    def fork(self) -> PromptLookup:
        """A drafter for another sequence: this one, which keeps no state."""
        return self


class DraftModel:
    """Drafts with a smaller model sharing the tokenizer; keeps its own KV cache across steps."""

    def __init__(self, model: Transformer):
        self.model = model
        self.cache: KVCache | None = None
        self.tokens: list[int] = []  # the tokens whose keys and values the cache holds, in order

    def fork(self) -> DraftModel:
        """A drafter for another sequence: the same model, a cache of its own."""
        return DraftModel(self.model)

    @torch.inference_mode()
    def draft(self, context: list[int], k: int, sampler=None) -> tuple[list[int], list[torch.Tensor | None]]:
        if len(context) + k > self.model.config.max_seq_len:  # past the draft model's context
            return [], []
        if self.cache is None or self.cache.max_seq_len < len(context) + k:
            self.cache = self.model.new_cache(1, min(2 * (len(context) + k), self.model.config.max_seq_len))
            self.tokens = []
        keep = 0
        for a, b in zip(self.tokens, context):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(context) - 1)  # always run the last token to get the next distribution
        device = self.model.device
        feed = context[keep:]
        tokens, qs = [], []
        for _ in range(k):
            x = torch.tensor([feed], device=device)
            logits = self.model(x, torch.arange(keep, keep + len(feed), device=device).unsqueeze(0), self.cache,
                                logits_at=torch.tensor([len(feed) - 1], device=device))[0, 0]
            keep += len(feed)
            if sampler is None or sampler.params.temperature == 0:
                token, q = int(logits.argmax()), None
            else:
                q = sampler.probs(logits)
                token = draw(q, sampler.generator)
            tokens.append(token)
            qs.append(q)
            feed = [token]
        self.tokens = context + tokens[:-1]
        return tokens, qs


def accept(p: torch.Tensor, q: torch.Tensor | None, token: int, generator: torch.Generator) -> int | None:
    """The speculative sampling rule for one proposal `token` drawn from q (None: q is one-hot on
    it): `token` if kept, else a token drawn from norm(max(0, p - q))."""
    q_token = 1.0 if q is None else float(q[token])
    if float(torch.rand((), generator=generator)) * q_token < float(p[token]):
        return None
    residual = p.clone()
    if q is None:
        residual[token] = 0.0
    else:
        residual = (residual - q).clamp_min(0.0)
    if float(residual.sum()) <= 0:  # p == q: keeping was certain; only rounding gets here
        return token
    return draw(residual, generator)


def verified(seq: Sequence, logits: torch.Tensor, drafts: list[int], qs: list) -> Iterator[int]:
    """The tokens that checking `drafts` (drawn from `qs`) against `logits` [len(drafts) + 1, vocab]
    gives: the model's logits after the last token and after each draft. Each kept draft, then the
    model's own token in place of the first rejected draft or after the last one. The caller
    appends each token to `seq` before asking for the next (the penalties and a JSON constraint
    must see it); it ends early once `seq` has finished."""
    greedy = seq.params.temperature == 0
    for i in range(len(drafts) + 1):
        row = seq.constrain(logits[i])
        if greedy or i == len(drafts):
            token = seq.sampler(row)
        else:
            token = accept(seq.sampler.probs(row), qs[i], drafts[i], seq.sampler.generator)
            token = drafts[i] if token is None else token
        yield token
        if seq.finished or i == len(drafts) or token != drafts[i]:
            return


def propose(seq: Sequence, drafter, k: int, ctx: int) -> tuple[list[int], list]:
    """Up to k drafts (and the distributions they were drawn from) for `seq`'s next tokens: as many
    as fit, with the model's token after them, in both the sequence's limit and `ctx` cache positions."""
    n = len(seq.prompt_ids) + len(seq.output_ids)
    room = min(seq.limit - len(seq.output_ids) - 1, ctx - n)
    return drafter.draft(seq.prompt_ids + seq.output_ids, min(k, room), seq.sampler) if room > 0 else ([], [])


def check(model: Transformer, cache, seq: Sequence, drafts: list[int]) -> torch.Tensor:
    """Logits [len(drafts) + 1, vocab] of one forward pass over `seq`'s last token and the drafts at
    their positions; `cache` (a KVCache, or the serving engine's rows of one slot) holds the rest."""
    n = len(seq.prompt_ids) + len(seq.output_ids)
    device = model.device
    tokens = torch.tensor([[seq.output_ids[-1], *drafts]], device=device)
    return model(tokens, torch.arange(n - 1, n + len(drafts), device=device).unsqueeze(0), cache)[0]


def speculative_step(model: Transformer, cache: KVCache, seq: Sequence, drafter, k: int) -> str:
    """One round for `seq`, whose context (prompt + output) is in `cache` except its last token (an
    output token):
    draft up to k tokens, verify them in one forward pass, append what is accepted plus one token
    of the model's own. Returns the text appended."""
    drafts, qs = propose(seq, drafter, k, cache.max_seq_len)
    logits = check(model, cache, seq, drafts).float().cpu()
    return "".join(seq.append(token) for token in verified(seq, logits, drafts, qs))


@torch.inference_mode()
def speculative_decode(model: Transformer, seq: Sequence, drafter, k: int = 5,
                       prefill_chunk: int = 512) -> Iterator[list[tuple[int, str]]]:
    """Generate `seq` speculatively; yields [(0, new text)] per round, as run_batch does. The prompt
    is prefilled exactly as run_batch prefills it, so the first token is the same too."""
    if k < 1:
        raise HerdError(f"draft length must be at least 1, got {k}")
    device = model.device
    prompt = seq.prompt_ids
    cache = model.new_cache(1, len(prompt) + seq.limit + k + 1)
    for start in range(0, len(prompt), prefill_chunk):
        end = min(start + prefill_chunk, len(prompt))
        logits = model(torch.tensor([prompt[start:end]], device=device), torch.arange(start, end, device=device),
                       cache, logits_at=torch.tensor([end - start - 1], device=device))
    yield [(0, seq.append(seq.sampler(logits[0, 0].float().cpu())))]
    while not seq.finished:
        yield [(0, speculative_step(model, cache, seq, drafter, k))]


def make_drafter(llm, draft=None, lookup: bool = False):
    """The drafter for the LLM `llm`: PromptLookup, or a DraftModel of the LLM `draft` (loaded by
    the caller: herd.llm.load_drafter), or None for neither."""
    if draft is not None and lookup:
        raise HerdError("choose a draft model or prompt lookup, not both")
    if lookup:
        return PromptLookup()
    if draft is None:
        return None
    if draft.config.vocab_size != llm.config.vocab_size or \
            draft.tokenizer.encode("Speculative drafts, 12345!") != llm.tokenizer.encode("Speculative drafts, 12345!"):
        raise HerdError(f"draft model {draft.name or ''} does not share the model's tokenizer")
    return DraftModel(draft.model)
