"""Code Llama infilling: the model writes the middle between a prefix and a suffix.

The prompt is Meta's: `<PRE> {prefix} <SUF>{suffix} <MID>` (prefix-suffix-middle), or with
suffix_first `<PRE> <SUF>{suffix} <MID> {prefix}`, and the model ends the middle with `<EOT>`.
As tokens (Meta's `infilling_prompt_tokens`): BOS, ▁<PRE>, the prefix encoded as usual (with
its dummy-prefix space), ▁<SUF>, the suffix encoded without that space, ▁<MID>.
"""

from __future__ import annotations

from herd.errors import HerdError
from herd.tokenizer.base import Tokenizer
from herd.tokenizer.spm import SentencePieceTokenizer

# Code Llama's pieces (ids 32007-32010 in its 32,016-piece vocabulary).
PRE, SUF, MID, EOT = "▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"


def infill_prompt(prefix: str, suffix: str, suffix_first: bool = False) -> str:
    """The prompt as text, as Meta publishes it: what the token ids decode to, BOS left out (an
    empty prefix encodes to no tokens, so the ids then hold one space fewer)."""
    if suffix_first:
        return f"<PRE> <SUF>{suffix} <MID> {prefix}"
    return f"<PRE> {prefix} <SUF>{suffix} <MID>"


def infill_token(tokenizer: Tokenizer, piece: str) -> int:
    """Id of one of Code Llama's infilling pieces, whether the vocabulary marks it special or not."""
    token = tokenizer.token_id(piece)
    if token is None and isinstance(tokenizer, SentencePieceTokenizer):
        token = tokenizer.piece_id(piece)
    if token is None:
        raise HerdError(f"this tokenizer has no {piece} token: infilling needs a Code Llama vocabulary")
    return token


def infill_ids(tokenizer: Tokenizer, prefix: str, suffix: str, suffix_first: bool = False) -> list[int]:
    """The prompt as token ids, BOS included."""
    if not isinstance(prefix, str) or not isinstance(suffix, str):
        raise HerdError("infill: prefix and suffix must be strings")
    if tokenizer.bos_id is None:
        raise HerdError("infill: the tokenizer has no BOS token")
    pre, suf, mid = (infill_token(tokenizer, p) for p in (PRE, SUF, MID))
    if suffix_first:
        return [tokenizer.bos_id, pre, suf, *_bare(tokenizer, suffix), mid, *tokenizer.encode(prefix)]
    return [tokenizer.bos_id, pre, *tokenizer.encode(prefix), suf, *_bare(tokenizer, suffix), mid]


def infill_stop_ids(tokenizer: Tokenizer) -> set[int]:
    """`<EOT>` and the end-of-sequence tokens."""
    return {infill_token(tokenizer, EOT)} | tokenizer.eos_ids


def _bare(tokenizer: Tokenizer, text: str) -> list[int]:
    """`text` encoded without the dummy-prefix space: Meta encodes "☺" + text and drops the tokens
    of "☺" (and of the space before it)."""
    if not text:
        return []
    ids = tokenizer.encode("☺" + text)
    for k in range(1, min(len(ids), 8) + 1):
        if tokenizer.decode(ids[:k]).endswith("☺"):
            return ids[k:]
    raise HerdError("infill: cannot encode the suffix without a leading space with this tokenizer")
