"""`herd chat`: a conversation at the terminal, or over standard input, as Ollama's `ollama run`
has it: \"\"\" blocks for multi-line messages, /set for the sampling settings and the system
prompt, /save and /load for conversations (JSON), tokens/s with --verbose. Nothing a user types
ends the conversation by mistake: a bad command, file or setting, or a message too long for the
context, is one line on stderr, and the conversation goes on. When the conversation outgrows the
context, its oldest turns are dropped (never the system prompt), and it says so."""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from herd.errors import HerdError
from herd.generate.params import SamplingParams, make_params

if TYPE_CHECKING:
    from herd.generate import Sequence
    from herd.llm import LLM

HELP = """commands:
  /set                      show the settings
  /set NAME VALUE           temperature, top_p, top_k, min_p, max_tokens, seed (none: unset), stop (words),
                            repetition_penalty, presence_penalty, frequency_penalty, ctx; Ollama's names
                            (/set parameter num_predict 100, repeat_penalty, num_ctx) too
  /set system TEXT          the system prompt (/set system alone: none)
  /set verbose | quiet      tokens/s after each reply, or not
  /save FILE, /load FILE    the conversation as JSON: {"messages": [...], "options": {...}}
  /reset (/clear)           start over; /bye quits (as Ctrl-D does)
  \"\"\"                       begins and ends a message of several lines"""

OLLAMA_NAMES = {"num_predict": "max_tokens", "repeat_penalty": "repetition_penalty", "num_ctx": "ctx"}
SETTINGS = {f.name: f.type for f in dataclasses.fields(SamplingParams) if "help" in f.metadata}
ROLES = ("system", "user", "assistant")


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def inputs(read: Callable[[str], str]) -> Iterator[str]:
    """Each message or command read with `read(prompt)` ("" at the end of input): a line, or the
    lines between an opening \"\"\" and the line that ends with \"\"\" (Ollama's multi-line input)."""
    while line := read(">>> "):
        text = line.strip()
        if text.startswith('"""'):
            text = text[3:]
            while not text.endswith('"""') and (more := read("... ")):
                text += "\n" + more.rstrip("\n")
            text = text.removesuffix('"""').strip()
        if text:
            yield text


class Chat:
    """A conversation with `llm`: the system prompt, the turns so far, the sampling options and
    the context (tokens) it must fit in."""

    def __init__(self, llm: LLM, options: dict, system: str | None = None, ctx: int | None = None,
                 verbose: bool = False, interactive: bool = False):
        self.llm = llm
        self.options = dict(options)
        self.system = system or ""
        self.turns: list[dict] = []
        self.ctx = self._checked_ctx(ctx or llm.config.max_seq_len)
        self.verbose = verbose
        self.interactive = interactive

    def messages(self, turns: list[dict] | None = None) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + (self.turns if turns is None else turns)

    def handle(self, text: str) -> bool:
        """Answer one input (a message or a /command); False once the user has said /bye."""
        if not text.startswith("/"):
            self.say(text)
            return True
        name, _, rest = text.partition(" ")
        if name in ("/bye", "/exit"):
            return False
        commands = {"/set": self.set, "/save": self.save, "/load": self.load, "/reset": self.reset,
                    "/clear": self.reset, "/help": lambda _: note(HELP), "/?": lambda _: note(HELP)}
        if name not in commands:
            note(f"unknown command {name}; /help lists them")
            return True
        try:
            commands[name](rest.strip())
        except HerdError as e:
            note(f"herd chat: error: {e}")
        return True

    def reset(self, _: str = "") -> None:
        self.turns = []
        note("(conversation cleared)")

    def say(self, text: str) -> None:
        """Send a user message and stream the reply; a message that cannot fit is refused with the
        reason, the conversation unchanged."""
        try:
            ids = self._fit(text)
            seq = self.llm.sequence(ids, make_params(self.options), self.llm.chat_stop_ids(), ctx=self.ctx)
        except HerdError as e:
            note(f"herd chat: error: {e}; the conversation goes on without it")
            return
        reply = self._stream(seq)
        self.turns += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]

    def _fit(self, text: str) -> list[int]:
        """The prompt of the conversation with `text` added, leaving room for a reply: the oldest
        turns dropped (and said so) while it would not."""
        turns = [*self.turns, {"role": "user", "content": text}]
        room = min(self.options.get("max_tokens", 256), self.ctx // 4)
        ids = self.llm.encode_chat(self.messages(turns))
        while len(ids) + room > self.ctx and len(turns) > 1:
            turns = turns[1:]
            while len(turns) > 1 and turns[0]["role"] != "user":  # a turn starts with the user
                turns = turns[1:]
            ids = self.llm.encode_chat(self.messages(turns))
        if len(ids) >= self.ctx:
            raise HerdError(f"the message is too long: the prompt would be {len(ids)} tokens but the context is "
                            f"{self.ctx} tokens")
        dropped = len(self.turns) + 1 - len(turns)
        if dropped:
            note(f"(the conversation outgrew the context of {self.ctx} tokens: dropped the oldest {dropped} "
                 f"message{'s' * (dropped > 1)}{', kept the system prompt' if self.system else ''})")
            self.turns = turns[:-1]
        return ids

    def _stream(self, seq: Sequence) -> str:
        """Write the reply as it comes; its text. With verbose, the speed after it."""
        pieces, start, first = [], time.perf_counter(), None
        try:
            for events in self.llm.decode([seq]):
                first = first or time.perf_counter()
                for _, text in events:
                    pieces.append(text)
                    sys.stdout.write(text)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            if not self.interactive:
                raise
            sys.stdout.write(" (stopped)")
        sys.stdout.write("\n")
        sys.stdout.flush()
        if self.verbose and first is not None:
            self._report(len(seq.prompt_ids), first - start, len(seq.output_ids), time.perf_counter() - first)
        return "".join(pieces)

    @staticmethod
    def _report(n_prompt: int, prefill: float, n_reply: int, decode: float) -> None:
        """Ollama's --verbose figures: the prompt's tokens and time (to the first reply token), and
        the reply's tokens and rate over the tokens after the first."""
        rate = f"{(n_reply - 1) / decode:.1f} tok/s" if n_reply > 1 and decode > 0 else "- tok/s"
        note(f"prompt: {n_prompt} tokens in {prefill:.2f} s ({n_prompt / max(prefill, 1e-9):.1f} tok/s); "
             f"reply: {n_reply} tokens, {rate}")

    # ---- /set -----------------------------------------------------------------------------------

    def set(self, rest: str) -> None:
        """/set NAME VALUE (or Ollama's /set parameter NAME VALUE), /set system TEXT, /set verbose."""
        if not rest:
            return self._show()
        name, _, value = rest.partition(" ")
        if name == "parameter":
            name, _, value = value.strip().partition(" ")
        name, value = OLLAMA_NAMES.get(name, name), value.strip()
        if name == "system":
            self.system = value
            note(f"(system prompt {'set' if value else 'removed'})")
        elif name in ("verbose", "quiet"):
            self.verbose = name == "verbose"
        elif name == "ctx":
            self.ctx = self._checked_ctx(_number(name, value, int))
        elif name in SETTINGS:
            options = {**self.options, name: _parse(name, value)}
            make_params(options)  # refuses a bad value before it is kept
            self.options = options
        else:
            raise HerdError(f"/set {name}: unknown setting; /help lists them")

    def _show(self) -> None:
        shown = {**self.options, "ctx": self.ctx, "verbose": self.verbose}
        note("  ".join(f"{k}={v}" for k, v in shown.items()) + f"\nsystem: {self.system or '(none)'}")

    def _checked_ctx(self, ctx: int) -> int:
        most = self.llm.config.max_seq_len
        if not 1 <= ctx <= most:
            raise HerdError(f"ctx must be between 1 and the model's context, {most} tokens; got {ctx}")
        return ctx

    # ---- /save and /load ------------------------------------------------------------------------

    def save(self, path: str) -> None:
        if not path:
            raise HerdError("/save needs a file name")
        data = {"model": self.llm.name, "options": self.options, "messages": self.messages()}
        try:
            Path(path).write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        except OSError as e:
            raise HerdError(f"cannot save to {path}: {e.strerror or e}") from None
        note(f"(saved {len(data['messages'])} messages to {path})")

    def load(self, path: str) -> None:
        """Replace the conversation (and the options it was saved with) by the one in `path`:
        {"messages": [...], "options": {...}}, or a bare list of messages."""
        if not path:
            raise HerdError("/load needs a file name")
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HerdError(f"cannot load {path}: {getattr(e, 'strerror', None) or e}") from None
        messages = data if isinstance(data, list) else data.get("messages") if isinstance(data, dict) else None
        saved = (data.get("options") or {}) if isinstance(data, dict) else {}
        try:
            _check_messages(messages)
            if not isinstance(saved, dict):
                raise HerdError('"options" is not an object')
            options = {**self.options, **saved}
            make_params(options)
        except HerdError as e:
            raise HerdError(f"cannot load {path}: {e}") from None
        has_system = bool(messages) and messages[0]["role"] == "system"
        self.system = messages[0]["content"] if has_system else ""
        self.turns = [{"role": m["role"], "content": m["content"]} for m in messages[has_system:]]
        self.options = options
        note(f"(loaded {len(messages)} messages from {path})")


def _check_messages(messages) -> None:
    if not isinstance(messages, list):
        raise HerdError('no conversation: expected {"messages": [...]} or a list of messages')
    for i, m in enumerate(messages, 1):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise HerdError(f"message {i} is not {{\"role\": system|user|assistant, \"content\": text}}")
        if m["role"] == "system" and i > 1:
            raise HerdError(f"message {i}: only the first message may be the system prompt")


def _parse(name: str, value: str):
    """A /set value as its SamplingParams field takes it."""
    kind = SETTINGS[name]
    if kind.startswith("list"):
        try:
            return shlex.split(value)
        except ValueError as e:
            raise HerdError(f"/set {name}: {e}") from None
    if kind.endswith("| None") and value.lower() in ("none", ""):
        return None
    return _number(name, value, int if kind.startswith("int") else float)


def _number(name: str, value: str, kind: type):
    try:
        return kind(value)
    except ValueError:
        raise HerdError(f"/set {name}: {value!r} is not {'an integer' if kind is int else 'a number'}") from None
