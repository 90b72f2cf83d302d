"""Find and open a tokenizer on disk, telling the kind from the file's content, not its name."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import tokenizers

from herd.errors import HerdError
from herd.tokenizer.base import Tokenizer
from herd.tokenizer.hf import HFTokenizer
from herd.tokenizer.spm import SentencePieceTokenizer
from herd.tokenizer.tiktoken_bpe import TiktokenTokenizer, read_ranks

_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+\r?\n")

# When a tokenizer.json comes without tokenizer_config.json, BOS and EOS are guessed by name.
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Open a tokenizer file (SentencePiece model, tiktoken rank file or tokenizer.json) or a
    directory holding tokenizer.json [+ tokenizer_config.json] or tokenizer.model."""
    path = Path(path)
    if path.is_dir():
        config = _read_config(path)
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return _load_file(path / name, config)
        raise HerdError(f"{path}: directory has no tokenizer.json or tokenizer.model")
    if not path.exists():
        raise HerdError(f"{path}: no such tokenizer file or directory")
    return _load_file(path, None)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise HerdError(f"{path}: cannot read ({e.strerror})") from None


def _is_json(data: bytes) -> bool:
    return data.lstrip()[:1] == b"{"


def _load_file(path: Path, config: dict[str, Any] | None) -> Tokenizer:
    """`config`: the directory's tokenizer_config.json; None when a file was named directly, in
    which case a tokenizer.json still takes the config beside it."""
    data = _read(path)
    if not data:
        raise HerdError(f"{path}: empty file")
    if data[:4] == b"GGUF":
        raise HerdError(f"{path}: a GGUF model file, not a tokenizer file; herd.load and --tokenizer read the "
                        "vocabulary it embeds")
    if _is_json(data):
        return _load_hf(path, data, _read_config(path.parent) if config is None else config)
    config = config or {}
    template = config.get("chat_template")
    if _TIKTOKEN_LINE.match(data):
        return TiktokenTokenizer(read_ranks(data, str(path)), str(path), chat_template=template)
    return SentencePieceTokenizer(data, str(path), add_bos=config.get("add_bos_token"), chat_template=template)


def _load_hf(path: Path, data: bytes, config: dict[str, Any]) -> HFTokenizer:
    try:
        tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise HerdError(f"{path}: not a valid tokenizer.json ({e})") from None
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    bos = _token_text(config.get("bos_token")) if "bos_token" in config else _first(_BOS_NAMES, specials)
    eos = _token_text(config.get("eos_token")) if "eos_token" in config else _first(_EOS_NAMES, specials)
    for role, text in (("bos_token", bos), ("eos_token", eos)):
        if text is not None and tok.token_to_id(text) is None:
            raise HerdError(f"{path}: {role} {text!r} is not in the vocabulary")
    add_bos = config.get("add_bos_token")
    if add_bos is None and bos is not None:
        # No flag: the post-processor says whether this tokenizer puts BOS first.
        add_bos = tok.encode("a", add_special_tokens=True).ids[:1] == [tok.token_to_id(bos)]
    return HFTokenizer(tok, bos, eos, add_bos=add_bos, chat_template=config.get("chat_template"))


def _read_config(directory: Path) -> dict[str, Any]:
    """tokenizer_config.json of `directory` (empty if absent), with chat_template resolved to a
    string (from the config, its named-template list, or chat_template.jinja)."""
    path = directory / "tokenizer_config.json"
    config: dict[str, Any] = {}
    if path.is_file():
        try:
            config = json.loads(_read(path))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HerdError(f"{path}: invalid JSON ({e})") from None
        if not isinstance(config, dict):
            raise HerdError(f"{path}: expected a JSON object")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    jinja_file = directory / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = _read(jinja_file).decode("utf-8", errors="replace")
    if template is not None and not isinstance(template, str):
        raise HerdError(f"{path}: chat_template must be a string")
    config["chat_template"] = template
    return config


def _token_text(value: Any) -> str | None:
    """A token as tokenizer_config.json spells it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _first(names: tuple[str, ...], present: set[str]) -> str | None:
    return next((n for n in names if n in present), None)
