"""Constrained decoding: at each step only the tokens that keep the output a prefix of a JSON
document matching a schema are allowed. The grammar engine is llguidance (Rust, CPU, offline);
it matches against the bytes of every token id, which `Tokenizer.token_bytes()` provides."""

from __future__ import annotations

import json
import weakref

import llguidance
import numpy as np
import torch

from herd.errors import HerdError
from herd.tokenizer import Tokenizer

_vocabularies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads from a tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokens = tokenizer.token_bytes()
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else min(tokenizer.eos_ids, default=0)
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = sorted(tokenizer.special_tokens.values())
        self._tokenizer = tokenizer

    def __call__(self, text: str | bytes) -> list[int]:
        """Tokens spelling exactly `text`: the tokenizer's own encoding when it does (a
        SentencePiece model prepends a space), else the longest known token at each point."""
        data = text if isinstance(text, bytes) else text.encode()
        try:
            ids = self._tokenizer.encode(data.decode())
            if b"".join(self.tokens[i] for i in ids) == data:
                return ids
        except UnicodeDecodeError:  # part of a character
            pass
        return self._greedy(data)

    def _greedy(self, data: bytes) -> list[int]:
        if not hasattr(self, "_by_bytes"):
            specials = set(self.special_token_ids)
            self._by_bytes = {b: i for i, b in reversed(list(enumerate(self.tokens))) if b and i not in specials}
            self._longest = max(map(len, self._by_bytes))
        ids, at = [], 0
        while at < len(data):
            for n in range(min(self._longest, len(data) - at), 0, -1):
                token = self._by_bytes.get(data[at : at + n])
                if token is not None:
                    ids.append(token)
                    at += n
                    break
            else:
                raise HerdError(f"constrained decoding: no token spells byte {data[at]:#04x}")
        return ids


def _ll_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of `tokenizer`, built once per tokenizer (it takes about a second)."""
    ll = _vocabularies.get(tokenizer)
    if ll is None:
        vocab = _Vocabulary(tokenizer)
        ends = sorted(tokenizer.eos_ids) or [vocab.eos_token_id]
        ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocab), eos_token=ends)
        _vocabularies[tokenizer] = ll
    return ll


def check_json_schema(schema) -> None:
    """Raise HerdError unless `schema` is a JSON schema (a dict, valid under its metaschema)."""
    import jsonschema  # 40 ms of import that requests without a schema need not spend

    if not isinstance(schema, dict):
        raise HerdError(f"json_schema must be a JSON object (a dict), got {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "the top level"
        raise HerdError(f"json_schema is not a valid JSON schema at {where}: {e.message}") from None


class JsonConstraint:
    """Allows only tokens that keep the output a prefix of a JSON value matching `schema`; once
    the value is complete, only an end token."""

    def __init__(self, tokenizer: Tokenizer, schema: dict):
        check_json_schema(schema)
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults={"whitespace_flexible": False})
        except ValueError as e:
            raise HerdError(f"json_schema cannot be compiled: {_first_line(e)}") from None
        self._matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer), grammar, log_level=0)
        if self._matcher.is_error():
            raise HerdError(f"json_schema cannot be enforced: {_first_line(self._matcher.get_error())}")
        self._n_tokens = tokenizer.vocab_size

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """Bool mask [vocab_size] of the tokens allowed next."""
        bits = np.unpackbits(np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        n = min(vocab_size, self._n_tokens)
        mask[:n] = torch.from_numpy(bits[:n].astype(bool))
        return mask

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise HerdError(f"constrained decoding: token {token} does not fit the grammar "
                            f"({_first_line(self._matcher.get_error())})")


def _first_line(e) -> str:
    return str(e).strip().split("\n", 1)[0]
