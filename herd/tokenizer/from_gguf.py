"""Tokenizers rebuilt from a GGUF file's metadata (llama.cpp's `tokenizer.ggml.*` keys).

A `llama` vocabulary becomes a SentencePiece model proto that `sentencepiece` runs; a `gpt2`
vocabulary becomes a byte-level BPE `tokenizers.Tokenizer`, split the way llama.cpp splits for
the file's `tokenizer.ggml.pre`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFBackend

from herd.errors import HerdError
from herd.tokenizer.base import Tokenizer
from herd.tokenizer.hf import HFTokenizer
from herd.tokenizer.spm import SentencePieceTokenizer
from herd.tokenizer.tiktoken_bpe import LLAMA3_PATTERN

# llama.cpp token types; SentencePiece numbers its piece types the same way.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SOURCE = "GGUF tokenizer metadata"


def tokenizer_from_gguf(fields: Mapping[str, Any]) -> Tokenizer:
    """Build the tokenizer a GGUF file describes; `fields` maps metadata keys to plain Python
    values (str, int, float, bool, lists)."""
    kind = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if not _list_of(tokens, str) or not tokens:
        raise HerdError(f"{SOURCE}: tokenizer.ggml.tokens is missing or not a list of strings")
    types = fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if not _list_of(types, int, len(tokens)) or not all(NORMAL <= t <= BYTE for t in types):
        raise HerdError(f"{SOURCE}: tokenizer.ggml.token_type must hold one type 1..6 per token")
    ids = {name: _token_id(fields, name, len(tokens)) for name in ("bos", "eos", "unknown")}
    add_bos = fields.get("tokenizer.ggml.add_bos_token")
    template = fields.get("tokenizer.chat_template")
    if not isinstance(add_bos, (bool, type(None))) or not isinstance(template, (str, type(None))):
        raise HerdError(f"{SOURCE}: tokenizer.ggml.add_bos_token must be true or false, and tokenizer.chat_template "
                        "a string")
    if kind == "llama":
        proto = _sentencepiece_proto(fields, tokens, types, ids)
        return SentencePieceTokenizer(proto, SOURCE, add_bos=add_bos, chat_template=template)
    if kind == "gpt2":
        backend = _byte_level_bpe(fields, tokens, types)
        bos, eos = (None if ids[k] is None else tokens[ids[k]] for k in ("bos", "eos"))
        return HFTokenizer(backend, bos, eos, add_bos=add_bos, chat_template=template)
    raise HerdError(f"{SOURCE}: tokenizer.ggml.model {kind!r} is not supported (llama, gpt2)")


def _list_of(value: Any, kind: type | tuple[type, ...], length: int | None = None) -> bool:
    """Whether `value` is a list of `kind` (bools excluded) of `length` items, when given."""
    return isinstance(value, list) and (length is None or len(value) == length) and \
        all(isinstance(v, kind) and not isinstance(v, bool) for v in value)


def _token_id(fields: Mapping[str, Any], name: str, n_tokens: int) -> int | None:
    """A special token id, or None when absent or unset (llama.cpp writes -1 as 0xFFFFFFFF)."""
    value = fields.get(f"tokenizer.ggml.{name}_token_id")
    return value if isinstance(value, int) and 0 <= value < n_tokens else None


def _sentencepiece_proto(fields: Mapping[str, Any], tokens: list[str], types: list[int], ids: dict) -> bytes:
    scores = fields.get("tokenizer.ggml.scores")
    if not _list_of(scores, (int, float), len(tokens)):
        raise HerdError(f"{SOURCE}: a llama vocabulary needs tokenizer.ggml.scores, one per token")
    from sentencepiece import sentencepiece_model_pb2 as pb  # protobuf: only for llama vocabularies

    model = pb.ModelProto()
    for text, score, kind in zip(tokens, scores, types):
        model.pieces.add(piece=text, score=float(score), type=kind)
    spec = model.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = BYTE in types
    for name in ("unk", "bos", "eos"):
        token = ids["unknown" if name == "unk" else name]
        setattr(spec, f"{name}_id", -1 if token is None else token)
        if token is not None:
            setattr(spec, f"{name}_piece", tokens[token])
    spec.pad_id = -1
    # llama.cpp neither collapses whitespace nor normalizes; it adds the dummy prefix space
    # unless the file says otherwise.
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return model.SerializeToString()


def _pre_tokenizer(pre: str):
    """(pre-tokenizer, ignore_merges) for a `tokenizer.ggml.pre` value, as llama.cpp splits."""
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt2"):
        return gpt2, False
    if pre == "smollm":  # every digit on its own, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2]), False
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated")
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), True
    raise HerdError(f"{SOURCE}: tokenizer.ggml.pre {pre!r} is not supported (default, gpt2, smollm, llama-bpe)")


def _byte_level_bpe(fields: Mapping[str, Any], tokens: list[str], types: list[int]) -> HFBackend:
    merges = fields.get("tokenizer.ggml.merges")
    if not _list_of(merges, str) or not merges:
        raise HerdError(f"{SOURCE}: a gpt2 vocabulary needs tokenizer.ggml.merges, a list of strings")
    pairs = []
    for merge in merges:
        cut = merge.find(" ", 1)  # as llama.cpp: the first space after the first character
        if cut < 0:
            raise HerdError(f"{SOURCE}: merge {merge!r} is not two tokens separated by a space")
        pairs.append((merge[:cut], merge[cut + 1 :]))
    pre, ignore_merges = _pre_tokenizer(str(fields.get("tokenizer.ggml.pre", "default")))
    vocab = {text: i for i, text in enumerate(tokens)}
    try:
        backend = HFBackend(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
    except Exception as e:  # tokenizers raises a bare Exception for merges naming unknown tokens
        raise HerdError(f"{SOURCE}: inconsistent vocabulary and merges ({e})") from None
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    # Control tokens are matched whole and are special; user-defined ones are matched whole but
    # are ordinary text (llama.cpp's rule).
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    )
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    )
    return backend
