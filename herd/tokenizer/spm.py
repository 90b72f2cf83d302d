"""SentencePiece back end (Llama 1/2, Code Llama, llama2.c): the `sentencepiece` library runs the
model, so encoding is exactly Meta's."""

from __future__ import annotations

import re

import sentencepiece

from herd.errors import HerdError
from herd.tokenizer.base import Tokenizer


class SentencePieceTokenizer(Tokenizer):
    """`model` is the serialized ModelProto (the bytes of a tokenizer.model); `source` names
    where it came from, for error messages."""

    hf_class = "LlamaTokenizer"

    def __init__(self, model: bytes, source: str, add_bos: bool | None = None, chat_template: str | None = None):
        # protobuf's Python side: 0.1 s of import that models with other tokenizers need not spend
        from google.protobuf.message import DecodeError
        from sentencepiece import sentencepiece_model_pb2

        try:
            sentencepiece_model_pb2.ModelProto().ParseFromString(model)
        except DecodeError:
            raise HerdError(
                f"{source}: not a tokenizer file (SentencePiece model, tiktoken rank file or tokenizer.json), "
                f"or a corrupt or truncated one"
            ) from None
        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(model)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with multi-line text
            raise HerdError(f"{source}: invalid SentencePiece model ({str(e).splitlines()[0]})") from None
        if sp.get_piece_size() == 0:
            raise HerdError(f"{source}: SentencePiece model has no pieces")
        self._sp = sp
        # Control and unknown pieces are the special tokens: sentencepiece never produces them
        # from text and decodes them to nothing, so we handle them ourselves.
        self._special_text = {
            i: sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)
        }
        specials = {text: i for i, text in self._special_text.items()}
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
        super().__init__(
            vocab_size=sp.get_piece_size(),
            special_tokens=specials,
            bos_id=sp.bos_id() if sp.bos_id() >= 0 else None,
            eos_id=sp.eos_id() if sp.eos_id() >= 0 else None,
            add_bos=add_bos,
            chat_template=chat_template,
        )

    def piece_id(self, piece: str) -> int | None:
        """Id of the piece spelled `piece` (any type), or None."""
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None

    def _encode(self, text: str, special: bool) -> list[int]:
        if not special or not self._special_text:
            return self._sp.encode(text)
        # Each stretch of text between special tokens is encoded on its own, with its own dummy
        # prefix space, as Meta's Llama 2 chat code encodes each turn.
        ids: list[int] = []
        start = 0
        for m in self._special_re.finditer(text):
            if m.start() > start:
                ids += self._sp.encode(text[start : m.start()])
            ids.append(self._special_tokens[m.group()])
            start = m.end()
        if start < len(text):
            ids += self._sp.encode(text[start:])
        return ids

    def _model_file(self) -> tuple[str, bytes]:
        return "tokenizer.model", self._sp.serialized_model_proto()

    def _decode(self, ids: list[int]) -> str:
        if not any(i in self._special_text for i in ids):
            return self._sp.decode(ids)
        parts, run = [], []
        for i in ids:
            if i in self._special_text:
                parts += [self._sp.decode(run), self._special_text[i]]
                run = []
            else:
                run.append(i)
        parts.append(self._sp.decode(run))
        return "".join(parts)

    def token_bytes(self) -> list[bytes]:
        out = []
        for i in range(self._sp.get_piece_size()):
            piece = self._sp.id_to_piece(i)
            if self._sp.is_byte(i):  # "<0x0A>"
                out.append(bytes([int(piece[3:5], 16)]))
            else:
                out.append(piece.replace("\u2581", " ").encode())
        return out
