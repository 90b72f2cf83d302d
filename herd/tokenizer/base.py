"""The interface every tokenizer back end implements, so generation and chat code never care
which library is underneath."""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

from herd.errors import HerdError

# Tokens that end a completion in the vocabularies that define them: Llama 3's end of text, end of
# turn and end of message, Llama 4's, ChatML's, GPT-2-style document end, Gemma's and Phi's.
END_TOKENS = (
    "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>",
    "<|eot|>", "<|eom|>",
    "<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|end|>",
)


class Tokenizer(ABC):
    """Text <-> token ids.

    `encode(special=False)` treats everything as text, so a user typing "<|eot_id|>" gets the
    characters, not the control token (Meta's behaviour); `special=True` maps special-token
    strings to their ids, which is what encoding a rendered chat template needs.
    """

    # The transformers class that reads the saved vocabulary file as this back end does (None: none does)
    hf_class: str | None = None

    def __init__(
        self,
        *,
        vocab_size: int,
        special_tokens: dict[str, int],
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool | None = None,
        chat_template: str | None = None,
    ):
        self._vocab_size = vocab_size
        self._special_tokens = dict(special_tokens)
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._add_bos = bos_id is not None and (add_bos is None or add_bos)
        self.chat_template = chat_template

    @abstractmethod
    def _encode(self, text: str, special: bool) -> list[int]: ...

    @abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def _model_file(self) -> tuple[str, bytes]:
        """(file name, content) of the vocabulary file `load_tokenizer` reads back."""

    def save(self, directory: str | os.PathLike) -> Path:
        """Write this tokenizer into `directory` as `load_tokenizer(directory)` (and transformers'
        AutoTokenizer) reads it back: the vocabulary file and a tokenizer_config.json naming the
        tokenizer class, BOS/EOS, the BOS flag and the chat template (trained models, fine-tunes and
        conversions from GGUF carry their tokenizer this way)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        name, data = self._model_file()
        (out / name).write_bytes(data)
        config = {
            **({"tokenizer_class": self.hf_class} if self.hf_class else {}),
            "bos_token": None if self._bos_id is None else self.decode([self._bos_id]),
            "eos_token": None if self._eos_id is None else self.decode([self._eos_id]),
            "add_bos_token": self._add_bos,
            "chat_template": self.chat_template,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return out

    def encode(self, text: str, bos: bool = False, eos: bool = False, special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise HerdError(f"encode: text must be a str, got {type(text).__name__}")
        ids = self._encode(text, special)
        if bos:
            if self._bos_id is None:
                raise HerdError("encode: bos=True but this tokenizer has no BOS token")
            ids.insert(0, self._bos_id)
        if eos:
            if self._eos_id is None:
                raise HerdError("encode: eos=True but this tokenizer has no EOS token")
            ids.append(self._eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens appear as their text."""
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self._vocab_size:
                raise HerdError(f"decode: token id {i} is outside the vocabulary of {self._vocab_size}")
        return self._decode(ids)

    @abstractmethod
    def token_bytes(self) -> list[bytes]:
        """The bytes each token id stands for, by id (a SentencePiece word's leading space
        included, byte-fallback pieces as their byte); special tokens as their text. Constrained
        decoding matches grammars against these."""

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        """The one EOS that `encode(eos=True)` appends."""
        return self._eos_id

    @property
    def eos_ids(self) -> set[int]:
        """Every token that ends a plain completion: the EOS and the end-of-turn tokens this
        vocabulary defines."""
        ids = {self._special_tokens[t] for t in END_TOKENS if t in self._special_tokens}
        if self._eos_id is not None:
            ids.add(self._eos_id)
        return ids

    @property
    def add_bos(self) -> bool:
        """Whether the model expects BOS before a prompt (False for e.g. SmolLM2, whose BOS is
        a chat marker); from the files' own flag when they have one."""
        return self._add_bos

    def token_id(self, text: str) -> int | None:
        """Id of the special/control token spelled `text`, or None."""
        return self._special_tokens.get(text)
