"""Hugging Face `tokenizers` back end: tokenizer.json files, and byte-level BPE vocabularies
rebuilt from GGUF metadata."""

from __future__ import annotations

import threading

import tokenizers

from herd.tokenizer.base import Tokenizer


class HFTokenizer(Tokenizer):
    """Wraps a `tokenizers.Tokenizer`; BOS/EOS are named by their text (as tokenizer_config.json
    names them). Its added tokens marked special are the special tokens."""

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
