"""Multiple-choice accuracy by log-likelihood (HellaSwag, ARC, MMLU style), scored the way
lm-evaluation-harness scores them: each choice is a continuation " choice" of the question, the
pick is the choice of highest log-likelihood (`acc`) or of highest log-likelihood per character
of the choice (`acc_norm`, which stops long choices losing for their length)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from herd.errors import HerdError
from herd.eval.scoring import score
from herd.model import Transformer
from herd.tokenizer import Tokenizer


@dataclass
class Item:
    question: str
    choices: list[str]
    answer: int


@dataclass
class ChoiceResult:
    acc: float
    acc_norm: float
    n: int
    picks: list[int]  # per item, by acc
    picks_norm: list[int]


def read_items(path: str | Path) -> list[Item]:
    """A JSONL file, one {"question": str, "choices": [str, ...], "answer": index or choice text}
    per line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise HerdError(f"{path}: cannot read ({e.strerror})") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise HerdError(f"{path}:{n}: not JSON ({e.msg})") from None
        items.append(_item(doc, f"{path}:{n}"))
    if not items:
        raise HerdError(f"{path}: no items")
    return items


def _item(doc, where: str) -> Item:
    if not isinstance(doc, dict):
        raise HerdError(f"{where}: expected a JSON object")
    question, choices, answer = doc.get("question"), doc.get("choices"), doc.get("answer")
    if not isinstance(question, str) or not question:
        raise HerdError(f"{where}: 'question' must be a non-empty string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise HerdError(f"{where}: 'choices' must be a list of at least two non-empty strings")
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise HerdError(f"{where}: 'answer' must be the index of a choice or its text, got {answer!r}")
    return Item(question, choices, answer)


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context (BOS first when the model expects it) and of the continuation after
    it: trailing spaces of the context move to the continuation, and the continuation's ids are
    what encoding the whole text adds after the context's, as lm-evaluation-harness does."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    bos = tokenizer.add_bos and tokenizer.bos_id is not None
    context_ids = tokenizer.encode(context, bos=bos)
    whole = tokenizer.encode(context + continuation, bos=bos)
    return context_ids, whole[len(context_ids):]


def multiple_choice(model: Transformer, tokenizer: Tokenizer, items: list[Item], batch_size: int = 8) -> ChoiceResult:
    requests = [encode_pair(tokenizer, item.question, " " + choice) for item in items for choice in item.choices]
    logprobs = [lp for lp, _ in score(model, requests, batch_size)]
    picks, picks_norm, k = [], [], 0
    for item in items:
        lps = logprobs[k:k + len(item.choices)]
        k += len(item.choices)
        picks.append(max(range(len(lps)), key=lambda j: lps[j]))
        picks_norm.append(max(range(len(lps)), key=lambda j: lps[j] / len(item.choices[j])))
    n = len(items)
    return ChoiceResult(acc=sum(p == it.answer for p, it in zip(picks, items)) / n,
                        acc_norm=sum(p == it.answer for p, it in zip(picks_norm, items)) / n,
                        n=n, picks=picks, picks_norm=picks_norm)
