"""Hugging Face `tokenizers` back end: tokenizer.json files, and byte-level BPE vocabularies
rebuilt from GGUF metadata."""

from __future__ import annotations

import json
import re
import threading

import tokenizers

from herd.tokenizer.base import Tokenizer


class HFTokenizer(Tokenizer):
    """Wraps a `tokenizers.Tokenizer`; BOS/EOS are named by their text (as tokenizer_config.json
    names them). Its added tokens marked special are the special tokens."""

    hf_class = "PreTrainedTokenizerFast"  # tokenizer.json as it is, whatever the model type

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        bos_token: str | None,
        eos_token: str | None,
        add_bos: bool | None = None,
        chat_template: str | None = None,
    ):
        self._tok = tokenizer
        # `encode_special_tokens` is state on the tokenizer object, flipped per call.
        self._lock = threading.Lock()
        specials = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self._added_ids = set(tokenizer.get_added_tokens_decoder())  # written as plain text
        super().__init__(
            vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
            special_tokens=specials,
            bos_id=None if bos_token is None else tokenizer.token_to_id(bos_token),
            eos_id=None if eos_token is None else tokenizer.token_to_id(eos_token),
            add_bos=add_bos,
            chat_template=chat_template,
        )

    def _encode(self, text: str, special: bool) -> list[int]:
        with self._lock:
            # True means "encode special-token strings as ordinary text".
            self._tok.encode_special_tokens = not special
            return self._tok.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def _model_file(self) -> tuple[str, bytes]:
        return "tokenizer.json", self._tok.to_str().encode("utf-8")

    def token_bytes(self) -> list[bytes]:
        """Byte-level vocabularies spell bytes as printable characters (GPT-2's table); others
        are SentencePiece-style, with U+2581 for a space and <0xNN> for byte fallback. Added
        tokens are plain text in both."""
        byte_level = "ByteLevel" in json.dumps(json.loads(self._tok.to_str()).get("decoder"))
        chars = _byte_level_chars() if byte_level else {}
        out = []
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i) or ""
            byte = None if byte_level else _BYTE_PIECE.fullmatch(piece)
            if i in self._added_ids:
                out.append(piece.encode())
            elif byte_level:
                out.append(bytes(chars[c] for c in piece))
            else:
                out.append(bytes([int(byte[1], 16)]) if byte else piece.replace("\u2581", " ").encode())
        return out


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte -> printable character table, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table
