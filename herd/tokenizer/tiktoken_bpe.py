"""tiktoken back end for Meta's Llama 3 and Llama 4 `tokenizer.model` files (base64 token and
rank per line). The files hold only the ranks; the split pattern and the special tokens come from
Meta's reference tokenizers, and which set applies is told by the number of ranks."""

from __future__ import annotations

import base64
import binascii
import re

import tiktoken

from herd.errors import HerdError
from herd.tokenizer.base import Tokenizer

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama 4 splits like GPT-4o: case-aware words, contractions attached, "/" kept after punctuation.
LLAMA4_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _llama3_specials() -> list[str]:
    """The 256 special tokens after Llama 3's 128,000 ranks (3.1 names: eom, python_tag)."""
    named = [
        "<|begin_of_text|>", "<|end_of_text|>",
        "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>", "<|step_id|>",
        "<|start_header_id|>", "<|end_header_id|>",
        "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
    ]
    return named + [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(named))]


def _llama4_specials() -> list[str]:
    """The 2,048 special tokens after Llama 4's 200,000 ranks, in Meta's order."""

    def reserved(group: str, count: int, first: int) -> list[str]:
        return [f"<|{group}_reserved_special_token_{i}|>" for i in range(first, first + count)]

    basic = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    text_post_train = [
        "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>",
        *reserved("text_post_train", 6, 0),
        "<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>",
        *reserved("text_post_train", 61, 8),
    ]
    vision = [
        "<|image_start|>", "<|image_end|>", "<|vision_reserved_special_token_0|>",
        "<|vision_reserved_special_token_1|>", "<|tile_x_separator|>", "<|tile_y_separator|>",
        *reserved("vision", 4, 2), "<|image|>", "<|vision_reserved_special_token_6|>", "<|patch|>",
        *reserved("vision", 1041, 7),
    ]
    reasoning = [*reserved("reasoning", 8, 0), "<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    named = basic + text_post_train + vision + reasoning
    return named + [f"<|reserved_special_token_{i}|>" for i in range(2048 - len(named))]


# number of ranks -> (name, split pattern, special tokens)
VOCABULARIES = {
    128000: ("llama3", LLAMA3_PATTERN, _llama3_specials),
    200000: ("llama4", LLAMA4_PATTERN, _llama4_specials),
}

# Meta's guards: tiktoken panics past ~400k characters and is quadratic on very long runs of
# whitespace or non-whitespace, so text is cut into blocks and long runs are cut every 25,000.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(rf"\s{{{MAX_RUN_CHARS + 1},}}|\S{{{MAX_RUN_CHARS + 1},}}")


def _chunks(text: str):
    for block_start in range(0, len(text), MAX_ENCODE_CHARS):
        block = text[block_start : block_start + MAX_ENCODE_CHARS]
        cut = 0
        for m in _LONG_RUN.finditer(block):
            for pos in range(m.start() + MAX_RUN_CHARS, m.end(), MAX_RUN_CHARS):
                yield block[cut:pos]
                cut = pos
        yield block[cut:]


def read_ranks(data: bytes, source: str) -> dict[bytes, int]:
    """Parse a tiktoken rank file: one `base64-token rank` pair per line."""
    ranks = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error):
            raise HerdError(f"{source}: line {n} is not a 'base64-token rank' pair") from None
        ranks[token] = rank
    return ranks


class TiktokenTokenizer(Tokenizer):
    def __init__(self, ranks: dict[bytes, int], source: str, chat_template: str | None = None):
        known = VOCABULARIES.get(len(ranks))
        if known is None:
            raise HerdError(
                f"{source}: {len(ranks)} BPE ranks matches no known vocabulary "
                f"(Llama 3 has 128000, Llama 4 has 200000); the file may be truncated"
            )
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise HerdError(f"{source}: ranks are not the numbers 0..{len(ranks) - 1}")
        self.name, pattern, specials = known
        self._ranks = ranks
        special_tokens = {t: len(ranks) + i for i, t in enumerate(specials())}
        self._enc = tiktoken.Encoding(
            name=self.name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens
        )
        super().__init__(
            vocab_size=len(ranks) + len(special_tokens),
            special_tokens=special_tokens,
            bos_id=special_tokens["<|begin_of_text|>"],
            eos_id=special_tokens["<|end_of_text|>"],
            chat_template=chat_template,
        )

    def _encode(self, text: str, special: bool) -> list[int]:
        allowed = "all" if special else set()
        ids: list[int] = []
        for chunk in _chunks(text):
            ids += self._enc.encode(chunk, allowed_special=allowed, disallowed_special=())
        return ids

    def _decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)

    def _model_file(self) -> tuple[str, bytes]:
        lines = (base64.b64encode(token) + b" %d\n" % rank for token, rank in self._ranks.items())
        return "tokenizer.model", b"".join(lines)

    def token_bytes(self) -> list[bytes]:
        return [self._enc.decode_single_token_bytes(i) for i in range(self.vocab_size)]
