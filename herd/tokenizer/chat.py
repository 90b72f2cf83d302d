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

from herd.errors import HerdError
from herd.tokenizer.base import Tokenizer
from herd.tokenizer.sandbox import BoundedSandbox
from herd.tokenizer.spm import SentencePieceTokenizer
from herd.tokenizer.tools import (
    PYTHON_END,
    PYTHON_START,
    PYTHON_TAG,
    json_call,
    normalize_tool_calls,
    pythonic_calls,
    pythonic_system_prompt,
    split_tools,
)

Message = Mapping[str, Any]
Segment = tuple[str, bool]  # (text, is a control token)


class ChatFormat(ABC):
    """`tools` is an OpenAI-shaped tool list ({"type": "function", "function": {"name",
    "description", "parameters"}}, or {"type": "brave_search"} for a Llama 3.1 built-in tool);
    formats without tool calling reject it."""

    @abstractmethod
    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True,
               tools: Sequence[Mapping] | None = None) -> str:
        """The prompt as text, control tokens written out."""

    @abstractmethod
    def encode(self, tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True,
               tools: Sequence[Mapping] | None = None) -> list[int]:
        """The prompt as token ids, BOS included: feed it to the model as is."""

    @abstractmethod
    def stop_ids(self, tokenizer: Tokenizer) -> set[int]:
        """Every token that ends the assistant's reply."""


TOOL_ROLES = ("tool", "ipython")


def check_messages(messages: Sequence[Message], roles: tuple[str, ...] | None) -> list[dict]:
    """Copies of `messages` after checking their shape; `roles=None` accepts any role and any
    content (a Jinja template decides). Keys set to None are dropped, as transformers does (OpenAI
    clients send `content: null` with tool calls), and tool-call arguments become dicts."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise HerdError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise HerdError(f"messages[{i}] must be a dict with a string 'role'")
        m = {k: v for k, v in m.items() if v is not None}
        if "tool_calls" in m:
            m["tool_calls"] = normalize_tool_calls(m, i)
            if not m["tool_calls"]:
                del m["tool_calls"]
        if roles is not None:
            if m["role"] not in roles:
                raise HerdError(f"messages[{i}]: role {m['role']!r} is not one of {', '.join(roles)}")
            if "tool_calls" in m and m["role"] != "assistant":
                raise HerdError(f"messages[{i}]: only assistant messages carry 'tool_calls'")
            if m["role"] in TOOL_ROLES:
                if "content" not in m:
                    raise HerdError(f"messages[{i}]: a tool result needs 'content'")
            elif "tool_calls" in m:
                if not isinstance(m.setdefault("content", ""), str):
                    raise HerdError(f"messages[{i}]: 'content' must be a string")
            elif not isinstance(m.get("content"), str):
                raise HerdError(f"messages[{i}]: 'content' must be a string")
        out.append(m)
    return out


class MarkupChat(ChatFormat):
    """A format built from segments: text is encoded as text, control tokens by id. Adjacent
    text segments are encoded together, as one string."""

    @abstractmethod
    def segments(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                 tools: Sequence[Mapping] | None = None) -> list[Segment]: ...

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True,
               tools: Sequence[Mapping] | None = None) -> str:
        return "".join(text for text, _ in self.segments(messages, add_generation_prompt, tools))

    def encode(self, tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True,
               tools: Sequence[Mapping] | None = None) -> list[int]:
        ids: list[int] = []
        text = ""
        for piece, control in self.segments(messages, add_generation_prompt, tools):
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

    def segments(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                 tools: Sequence[Mapping] | None = None) -> list[Segment]:
        msgs = check_messages(messages, ("system", "user", "assistant"))
        if tools is not None or any("tool_calls" in m for m in msgs):
            raise HerdError("Llama 2 chat has no tool calling")
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


# The Llama 3.1+ templates' instructions for JSON tool calls; in the system message when tools
# are not in the first user message, in that message (the default) otherwise.
_JSON_TOOLS_SYSTEM = (
    "You have access to the following functions. To call a function, please respond with JSON for a function call."
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)
_JSON_TOOLS_USER = (
    "Given the following functions, please respond with a JSON for a function call "
    "with its proper arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)


def _tool_listing(functions: list[dict]) -> str:
    return "".join(_tojson(t, indent=4) + "\n\n" for t in functions)


def json_tools_system(functions: list[dict]) -> str:
    """Llama 3.1's system-message text offering `functions` for JSON tool calls (the server writes
    it for chat formats that know no tools, too)."""
    return _JSON_TOOLS_SYSTEM + _tool_listing(functions)


def _tool_result(content: Any) -> str:
    # The templates test `content is mapping or content is iterable`, true for strings as well:
    # every tool result but a number is written as JSON, a string result quoted.
    return _tojson(content) if isinstance(content, (str, Mapping, list, tuple)) else str(content)


class HeaderChat(MarkupChat):
    """What Llama 3.x and Llama 4 share: a role between header tokens, then content and an end of
    turn token; tool results under the `ipython` role; JSON tool calls."""

    BEGIN, HEADER_START, HEADER_END, EOT, EOM = "<|begin_of_text|>", "", "", "", ""
    roles = ("system", "user", "assistant", *TOOL_ROLES)

    def __init__(self, tools_in_user_message: bool = True):
        self.tools_in_user_message = tools_in_user_message

    def _header(self, role: str) -> list[Segment]:
        return [(self.HEADER_START, True), (role, False), (self.HEADER_END, True), ("\n\n", False)]

    def _turn(self, role: str, content: str) -> list[Segment]:
        return self._header(role) + [(content, False), (self.EOT, True)]

    def _tools_in_user_message(self, msgs: list[dict], functions: list[dict]) -> list[Segment]:
        """The first user message with the tool list and instructions before it (popped from msgs)."""
        if not msgs or msgs[0]["role"] != "user":
            raise HerdError("with tools, the conversation needs a user message after the system message")
        first = msgs.pop(0)["content"].strip()
        return self._turn("user", _JSON_TOOLS_USER + _tool_listing(functions) + first)

    def stop_ids(self, tokenizer: Tokenizer) -> set[int]:
        ends = (tokenizer.token_id(t) for t in (self.EOT, self.EOM, "<|end_of_text|>"))
        return {t for t in ends if t is not None}


class Llama3Chat(HeaderChat):
    """Llama 3.x instruct: `<|start_header_id|>role<|end_header_id|>\\n\\n` content `<|eot_id|>`,
    content trimmed, after `<|begin_of_text|>`.

    dated=True is the Llama 3.1/3.2/3.3 layout of the official templates: a system turn always
    comes first and opens with "Cutting Knowledge Date: December 2023\\nToday Date: {date}\\n\\n".
    `date` defaults to today, "%d %b %Y" (3.2's template; pass "26 Jul 2024" for the 3.1/3.3
    templates' fixed default). dated=False is Llama 3.0's layout: the messages only, no tools.

    Tools (3.1+) render as the official templates render them: "Environment: ipython", built-in
    tools named on a "Tools:" line and called as `<|python_tag|>name.call(...)` ending with
    `<|eom_id|>`, custom tools listed as JSON in the first user message (or in the system message
    with tools_in_user_message=False), one JSON call per assistant message, results under the
    `ipython` role. tool_format="pythonic" is Meta's Llama 3.2 lightweight-model format instead:
    the tools in the system message with Meta's pythonic instructions, calls written
    `[f(a=1), g(b="x")]`, several per message.
    """

    HEADER_START, HEADER_END, EOT, EOM = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"

    def __init__(self, dated: bool = True, date: str | None = None, tools_in_user_message: bool = True,
                 tool_format: str = "json"):
        if tool_format not in ("json", "pythonic"):
            raise HerdError(f"tool_format must be 'json' or 'pythonic', got {tool_format!r}")
        super().__init__(tools_in_user_message)
        self.dated = dated
        self.date = date
        self.tool_format = tool_format

    def segments(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                 tools: Sequence[Mapping] | None = None) -> list[Segment]:
        msgs = check_messages(messages, self.roles if self.dated else ("system", "user", "assistant"))
        functions, builtin = split_tools(tools)
        if not self.dated and (functions or builtin or any("tool_calls" in m for m in msgs)):
            raise HerdError("the Llama 3.0 chat format (dated=False) has no tool calling")
        pythonic = self.tool_format == "pythonic"
        out: list[Segment] = [(self.BEGIN, True)]
        if self.dated:
            system = msgs.pop(0)["content"].strip() if msgs[0]["role"] == "system" else ""
            head = "Environment: ipython\n" if functions or builtin else ""
            if builtin:
                head += "Tools: " + ", ".join(b for b in builtin if b != "code_interpreter") + "\n\n"
            head += f"Cutting Knowledge Date: December 2023\nToday Date: {self.date or datetime.now().strftime('%d %b %Y')}\n\n"
            if functions and pythonic:
                head += pythonic_system_prompt(functions) + ("\n\n" if system else "")
            elif functions and not self.tools_in_user_message:
                head += json_tools_system(functions)
            out += self._turn("system", head + system)
            if functions and not pythonic and self.tools_in_user_message:
                out += self._tools_in_user_message(msgs, functions)
        for m in msgs:
            if m["role"] in TOOL_ROLES:
                out += self._turn("ipython", _tool_result(m["content"]))
            elif "tool_calls" in m:
                out += self._header("assistant") + self._calls(m["tool_calls"], builtin or [])
                out.append((self.EOM if builtin else self.EOT, True))
            else:
                out += self._turn(m["role"], m["content"].strip())
        if add_generation_prompt:
            out += self._header("assistant")
        return out

    def _calls(self, calls: list[dict], builtin: list[str]) -> list[Segment]:
        fns = [(c["function"]["name"], c["function"]["arguments"]) for c in calls]
        if len(fns) == 1 and fns[0][0] in builtin:
            name, args = fns[0]
            text = name + ".call(" + ", ".join(f'{k}="{v}"' for k, v in args.items()) + ")"
            return [(PYTHON_TAG, True), (text, False)]
        if self.tool_format == "pythonic":
            return [(pythonic_calls(fns), False)]
        if len(fns) != 1:
            raise HerdError("the Llama 3.1 JSON tool format has one tool call per assistant message "
                            "(tool_format='pythonic' takes several)")
        return [(json_call(*fns[0]), False)]


class Llama4Chat(HeaderChat):
    """Llama 4 instruct, as its official template (shipped with transformers' Llama 4 processor)
    renders it: `<|header_start|>role<|header_end|>\\n\\n` content `<|eot|>`, content as given,
    a system turn only when there is a system message. Tools as in Llama 3.1 (JSON listing);
    an assistant tool-call message is `<|python_start|>content<|python_end|>` followed by its
    calls as JSON. Llama 4 itself answers with pythonic calls; `parse_tool_calls` reads both."""

    HEADER_START, HEADER_END, EOT, EOM = "<|header_start|>", "<|header_end|>", "<|eot|>", "<|eom|>"

    def segments(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                 tools: Sequence[Mapping] | None = None) -> list[Segment]:
        msgs = check_messages(messages, self.roles)
        functions, builtin = split_tools(tools)
        if builtin:
            raise HerdError(f"Llama 4 has no built-in tools ({', '.join(builtin)}); describe them as functions")
        out: list[Segment] = [(self.BEGIN, True)]
        if msgs[0]["role"] == "system":
            system = msgs.pop(0)["content"].strip()
            head = "Environment: ipython\n" if functions else ""
            if functions and not self.tools_in_user_message:
                head += json_tools_system(functions)
            out += self._turn("system", head + system)
        if functions and self.tools_in_user_message:
            out += self._tools_in_user_message(msgs, functions)
        for m in msgs:
            if m["role"] in TOOL_ROLES:
                out += self._turn("ipython", _tool_result(m["content"]))
            elif "tool_calls" in m:
                calls = "".join(json_call(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"])
                out += self._header("assistant") + [(PYTHON_START, True), (m["content"], False), (PYTHON_END, True),
                                                    (calls, False), (self.EOT, True)]
            else:
                out += self._turn(m["role"], m["content"])
        if add_generation_prompt:
            out += self._header("assistant")
        return out


# Private-use characters that bracket control-token strings found in message content while a
# Jinja template renders, so encode() can tell them from the template's own markup.
_OPEN, _CLOSE = "\U000f0000", "\U000f0001"


def _tojson(value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain json.dumps, as
    # transformers renders them.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _first_line(text: str | None) -> str:
    return (text or "").strip().split("\n", 1)[0][:500]  # a template can raise with any message


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
    so tests can fix the date) and a json.dumps `tojson`. A template is code from a checkpoint,
    so each render is bounded in time and size (herd.tokenizer.sandbox)."""

    def __init__(
        self, template: str, bos_token: str = "", eos_token: str = "", now: Callable[[], datetime] = datetime.now
    ):
        if not isinstance(template, str):
            raise HerdError(f"chat template must be a string, got {type(template).__name__}")
        self.bos_token, self.eos_token = bos_token, eos_token
        self._env = BoundedSandbox(
            filters={"tojson": _tojson},
            globals={"raise_exception": _raise_exception, "strftime_now": lambda fmt: now().strftime(fmt)},
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols],
        )
        try:
            self._template = self._env.template(template)
        except jinja2.TemplateSyntaxError as e:
            raise HerdError(f"chat template: syntax error on line {e.lineno}: {e.message}") from None

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True,
               tools: Sequence[Mapping] | None = None) -> str:
        return self._render(check_messages(messages, None), add_generation_prompt, tools)

    def _render(self, messages: list, add_generation_prompt: bool, tools: Sequence[Mapping] | None) -> str:
        functions, builtin = split_tools(tools)
        extra = {"builtin_tools": builtin} if builtin else {}  # templates test `builtin_tools is defined`
        try:
            return self._env.render(
                self._template,
                messages=messages,
                tools=functions,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except HerdError:  # a limit
            raise
        except jinja2.TemplateError as e:  # includes raise_exception() and undefined names
            raise HerdError(f"chat template: {_first_line(e.message) or type(e).__name__}") from None
        except RecursionError:
            raise HerdError("chat template: its macros or loops recurse deeper than Python's recursion limit") from None
        except Exception as e:  # a template is code: its bugs surface as TypeError, KeyError, MemoryError...
            detail = _first_line(str(e))
            raise HerdError(f"chat template failed: {type(e).__name__}" + (f": {detail}" if detail else "")) from None

    def encode(self, tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True,
               tools: Sequence[Mapping] | None = None) -> list[int]:
        """Render with control-token strings in the messages (and tools) marked, then encode the template's
        text with special tokens recognised and each marked string as plain text. Markers a
        template splits apart (string slicing) still cut the text there and are dropped.

        For a SentencePiece vocabulary each cut adds a dummy-prefix space, so the ids of such
        content differ slightly from encoding the rendered text; they remain plain text."""
        msgs = check_messages(messages, None)
        specials = tokenizer.special_tokens
        if not specials:
            ids = tokenizer.encode(self._render(msgs, add_generation_prompt, tools), special=True)
        else:
            control = _control_pattern(tuple(specials))
            text = self._render(_mark(msgs, control), add_generation_prompt, _mark(tools, control))
            pieces = re.split(f"{_OPEN}({control.pattern}){_CLOSE}|[{_OPEN}{_CLOSE}]", text)
            ids = []
            for i, piece in enumerate(pieces):
                if piece:  # even: template text; odd: a marked string from the messages
                    ids += tokenizer.encode(piece, special=i % 2 == 0)
        if not ids:
            raise HerdError("the chat template rendered an empty prompt: there is no token to generate from")
        return ids

    def stop_ids(self, tokenizer: Tokenizer) -> set[int]:
        eos = tokenizer.token_id(self.eos_token)
        return tokenizer.eos_ids | ({eos} if eos is not None else set())


def chat_format_for(tokenizer: Tokenizer, family: str | None = None) -> ChatFormat:
    """The tokenizer's own chat template if it carries one; else the built-in format of the
    model family ("llama2", "codellama", "llama3", "llama4"); else one told by the vocabulary."""
    if tokenizer.chat_template:
        bos = "" if tokenizer.bos_id is None else tokenizer.decode([tokenizer.bos_id])
        eos = "" if tokenizer.eos_id is None else tokenizer.decode([tokenizer.eos_id])
        return JinjaChat(tokenizer.chat_template, bos, eos)
    if family in ("llama2", "codellama"):
        return Llama2Chat()
    if family == "llama3" or tokenizer.token_id("<|start_header_id|>") is not None:
        return Llama3Chat()
    if family == "llama4" or tokenizer.token_id("<|header_start|>") is not None:
        return Llama4Chat()
    if isinstance(tokenizer, SentencePieceTokenizer) and tokenizer.token_id("</s>") is not None:
        return Llama2Chat()
    raise HerdError(
        f"no chat format for this model: its tokenizer carries no chat template and "
        f"family {family!r} / its vocabulary match no built-in format (llama2, codellama, llama3, llama4)"
    )
