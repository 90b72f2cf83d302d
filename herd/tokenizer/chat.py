"""Chat formats: OpenAI-shaped messages -> prompt text and token ids, and the tokens that end a
reply.

The built-in formats (Llama 2, Llama 3.x) are written as a list of segments, each either text or
a control token, so that rendering and encoding can never disagree and message content is always
encoded as text: a user typing "<|eot_id|>" cannot forge the control token. A model's own Jinja
template (`JinjaChat`) gets the same protection by marking control-token strings in the messages
before rendering; see `JinjaChat.encode`.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from herd.errors import HerdError
from herd.tokenizer.base import Tokenizer
from herd.tokenizer.spm import SentencePieceTokenizer

Message = Mapping[str, Any]
Segment = tuple[str, bool]  # (text, is a control token)


class ChatFormat(ABC):
    @abstractmethod
    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt as text, control tokens written out."""

    @abstractmethod
    def encode(
        self, tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True
    ) -> list[int]:
        """The prompt as token ids, BOS included: feed it to the model as is."""

    @abstractmethod
    def stop_ids(self, tokenizer: Tokenizer) -> set[int]:
        """Every token that ends the assistant's reply."""


def _check_messages(messages: Sequence[Message], roles: tuple[str, ...] | None) -> list[dict]:
    """Copies of `messages` after checking their shape; `roles=None` accepts any role and any
    content (a Jinja template decides)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise HerdError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise HerdError(f"messages[{i}] must be a dict with a string 'role'")
        if roles is not None:
            if m["role"] not in roles:
                raise HerdError(f"messages[{i}]: role {m['role']!r} is not one of {', '.join(roles)}")
            if not isinstance(m.get("content"), str):
                raise HerdError(f"messages[{i}]: 'content' must be a string")
        out.append(dict(m))
    return out


class MarkupChat(ChatFormat):
    """A format built from segments: text is encoded as text, control tokens by id. Adjacent
    text segments are encoded together, as one string."""

    @abstractmethod
    def segments(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[Segment]: ...

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        return "".join(text for text, _ in self.segments(messages, add_generation_prompt))

    def encode(
        self, tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True
    ) -> list[int]:
        ids: list[int] = []
        text = ""
        for piece, control in self.segments(messages, add_generation_prompt):
            if not control:
                text += piece
                continue
            token = tokenizer.token_id(piece)
            if token is None:
                raise HerdError(f"{type(self).__name__} needs the control token {piece}, which this tokenizer lacks")
            if text:
                ids += tokenizer.encode(text)
                text = ""
            ids.append(token)
        if text:
            ids += tokenizer.encode(text)
        return ids


class Llama2Chat(MarkupChat):
    """Meta's Llama 2 chat layout, as its reference `chat_completion` builds it: every
    user/assistant pair is `<s>[INST] user [/INST] answer </s>`, the last user turn
    `<s>[INST] user [/INST]`, and a system prompt is folded into the first user turn between
    <<SYS>> markers. [INST] is plain text in this vocabulary; only BOS/EOS are control tokens."""

    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

    def segments(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[Segment]:
        msgs = _check_messages(messages, ("system", "user", "assistant"))
        if msgs[0]["role"] == "system":
            if len(msgs) < 2:
                raise HerdError("Llama 2 chat: a system message must be followed by a user message")
            content = self.B_SYS + msgs[0]["content"] + self.E_SYS + msgs[1]["content"]
            msgs = [{"role": msgs[1]["role"], "content": content}] + msgs[2:]
        for i, m in enumerate(msgs):
            if m["role"] != ("user", "assistant")[i % 2]:
                raise HerdError(
                    "Llama 2 chat: messages must be an optional system message, then user and assistant in turn"
                )
        if add_generation_prompt and msgs[-1]["role"] != "user":
            raise HerdError("Llama 2 chat: the last message must be the user's to prompt a reply")
        out: list[Segment] = []
        for user, answer in zip(msgs[::2], msgs[1::2]):
            turn = f"{self.B_INST} {user['content'].strip()} {self.E_INST} {answer['content'].strip()} "
            out += [("<s>", True), (turn, False), ("</s>", True)]
        if len(msgs) % 2:
            out += [("<s>", True), (f"{self.B_INST} {msgs[-1]['content'].strip()} {self.E_INST}", False)]
        return out

    def stop_ids(self, tokenizer: Tokenizer) -> set[int]:
        return tokenizer.eos_ids


class Llama3Chat(MarkupChat):
    """Llama 3.x instruct: `<|start_header_id|>role<|end_header_id|>\\n\\n` content `<|eot_id|>`,
    content trimmed, after `<|begin_of_text|>`.

    dated=True is the Llama 3.1/3.2/3.3 layout of the official templates: a system turn always
    comes first and opens with "Cutting Knowledge Date: December 2023\\nToday Date: {date}\\n\\n".
    `date` defaults to today, "%d %b %Y" (3.2's template; pass "26 Jul 2024" for the 3.1/3.3
    templates' fixed default). dated=False is Llama 3.0's layout: the messages only.

    Tool calling (ipython role, tool lists, <|python_tag|>, <|eom_id|>) would extend `roles` and
    `_turn`; this class does not do it yet.
    """

    roles = ("system", "user", "assistant")

    def __init__(self, dated: bool = True, date: str | None = None):
        self.dated = dated
        self.date = date

    def segments(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[Segment]:
        msgs = _check_messages(messages, self.roles)
        out: list[Segment] = [("<|begin_of_text|>", True)]
        if self.dated:
            system = ""
            if msgs[0]["role"] == "system":
                system = msgs.pop(0)["content"].strip()
            date = self.date or datetime.now().strftime("%d %b %Y")
            out += self._turn("system", f"Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n{system}")
        for m in msgs:
            out += self._turn(m["role"], m["content"].strip())
        if add_generation_prompt:
            out += self._header("assistant")
        return out

    @staticmethod
    def _header(role: str) -> list[Segment]:
        return [("<|start_header_id|>", True), (role, False), ("<|end_header_id|>", True), ("\n\n", False)]

    def _turn(self, role: str, content: str) -> list[Segment]:
        return self._header(role) + [(content, False), ("<|eot_id|>", True)]

    def stop_ids(self, tokenizer: Tokenizer) -> set[int]:
        ends = (tokenizer.token_id(t) for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"))
        return {t for t in ends if t is not None}


# Private-use characters that bracket control-token strings found in message content while a
# Jinja template renders, so encode() can tell them from the template's own markup.
_OPEN, _CLOSE = "\U000f0000", "\U000f0001"


def _tojson(value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain json.dumps, as
    # transformers renders them.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _first_line(text: str | None) -> str:
    return (text or "").strip().split("\n", 1)[0]


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


@lru_cache(maxsize=8)
def _control_pattern(tokens: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def _mark(value: Any, control: re.Pattern) -> Any:
    """`value` with every control-token string in its strings bracketed by markers (markers
    already there are dropped first, so they cannot be forged)."""
    if isinstance(value, str):
        value = value.replace(_OPEN, "").replace(_CLOSE, "")
        return control.sub(lambda m: _OPEN + m.group() + _CLOSE, value)
    if isinstance(value, Mapping):
        return {k: _mark(v, control) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mark(v, control) for v in value]
    return value


class JinjaChat(ChatFormat):
    """A model's own chat template, rendered as transformers renders it: a sandboxed Jinja
    environment with trim_blocks/lstrip_blocks, `raise_exception`, `strftime_now` (from `now`,
    so tests can fix the date) and a json.dumps `tojson`."""

    def __init__(
        self, template: str, bos_token: str = "", eos_token: str = "", now: Callable[[], datetime] = datetime.now
    ):
        if not isinstance(template, str):
            raise HerdError(f"chat template must be a string, got {type(template).__name__}")
        self.bos_token, self.eos_token = bos_token, eos_token
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: now().strftime(fmt)
        try:
            self._template = env.from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise HerdError(f"chat template: syntax error on line {e.lineno}: {e.message}") from None

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        return self._render(_check_messages(messages, None), add_generation_prompt)

    def _render(self, messages: list, add_generation_prompt: bool) -> str:
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as e:  # includes raise_exception() and undefined names
            raise HerdError(f"chat template: {_first_line(e.message) or type(e).__name__}") from None
        except Exception as e:  # a template is code: its bugs surface as TypeError, KeyError, ...
            raise HerdError(f"chat template failed: {type(e).__name__}: {_first_line(str(e))}") from None

    def encode(
        self, tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True
    ) -> list[int]:
        """Render with control-token strings in the messages marked, then encode the template's
        text with special tokens recognised and each marked string as plain text. Markers a
        template splits apart (string slicing) still cut the text there and are dropped.

        For a SentencePiece vocabulary each cut adds a dummy-prefix space, so the ids of such
        content differ slightly from encoding the rendered text; they remain plain text."""
        msgs = _check_messages(messages, None)
        specials = tokenizer.special_tokens
        if not specials:
            return tokenizer.encode(self._render(msgs, add_generation_prompt), special=True)
        control = _control_pattern(tuple(specials))
        text = self._render(_mark(msgs, control), add_generation_prompt)
        pieces = re.split(f"{_OPEN}({control.pattern}){_CLOSE}|[{_OPEN}{_CLOSE}]", text)
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if piece:  # even: template text; odd: a marked string from the messages
                ids += tokenizer.encode(piece, special=i % 2 == 0)
        return ids

    def stop_ids(self, tokenizer: Tokenizer) -> set[int]:
        eos = tokenizer.token_id(self.eos_token)
        return tokenizer.eos_ids | ({eos} if eos is not None else set())


def chat_format_for(tokenizer: Tokenizer, family: str | None = None) -> ChatFormat:
    """The tokenizer's own chat template if it carries one; else the built-in format of the
    model family ("llama2", "codellama", "llama3"); else one told by the vocabulary."""
    if tokenizer.chat_template:
        bos = "" if tokenizer.bos_id is None else tokenizer.decode([tokenizer.bos_id])
        eos = "" if tokenizer.eos_id is None else tokenizer.decode([tokenizer.eos_id])
        return JinjaChat(tokenizer.chat_template, bos, eos)
    if family in ("llama2", "codellama"):
        return Llama2Chat()
    if family == "llama3" or tokenizer.token_id("<|start_header_id|>") is not None:
        return Llama3Chat()
    if isinstance(tokenizer, SentencePieceTokenizer) and tokenizer.token_id("</s>") is not None:
        return Llama2Chat()
    raise HerdError(
        f"no chat format for this model: its tokenizer carries no chat template and "
        f"family {family!r} / its vocabulary match no built-in format (llama2, codellama, llama3)"
    )
