"""Turning a stream of generated token ids into text as it becomes final."""

from __future__ import annotations

from herd.tokenizer.base import Tokenizer

# A UTF-8 character spans at most 4 bytes, so text still ending in U+FFFD after this many
# pending tokens is genuinely invalid bytes, not a character waiting for its tail.
MAX_PENDING = 8


class StreamDecoder:
    """Incremental decode with a sliding window.

    The window is the last token already shown (context) plus the tokens not yet shown. The new
    text is decode(window) minus decode(context): the context keeps a SentencePiece word's
    leading space, which decoding a token alone would drop. Text ending in U+FFFD is held back
    until the rest of its UTF-8 character arrives. Concatenating every push() and the final
    flush() gives exactly decode(all ids).
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._reset()

    def _reset(self) -> None:
        self._window: list[int] = []
        self._context = 0  # how many leading window tokens were already shown
        self._context_text = ""

    def push(self, token_id: int) -> str:
        """The text that `token_id` makes final (often "", never half a character)."""
        self._window.append(token_id)
        text = self._tokenizer.decode(self._window)
        if text.endswith("\ufffd") and len(self._window) - self._context < MAX_PENDING:
            return ""
        new = text[len(self._context_text) :]
        self._window = self._window[-1:]
        self._context = 1
        self._context_text = self._tokenizer.decode(self._window)
        return new

    def flush(self) -> str:
        """Whatever is still held back (at the end of the sequence); the decoder starts afresh."""
        new = self._tokenizer.decode(self._window)[len(self._context_text) :] if self._window else ""
        self._reset()
        return new
