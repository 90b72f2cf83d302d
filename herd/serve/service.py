"""What both APIs share: the served model's identity, prompts from messages, and engine requests
from sampling fields."""

from __future__ import annotations

import json
import time

from herd.engine import Engine, Request
from herd.errors import HerdError
from herd.generate import SamplingParams
from herd.serve.errors import APIError
from herd.tokenizer import JinjaChat


class Service:
    def __init__(self, engine: Engine, name: str | None = None):
        self.engine = engine
        self.llm = engine.llm
        self.name = name or self.llm.name or "herd"
        self.created = int(time.time())
        self._token_bytes: list[bytes] | None = None

    def check_model(self, model: str) -> None:
        if model not in (self.name, f"{self.name}:latest"):
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.name!r}",
                           param="model", code="model_not_found")

    def chat_ids(self, messages: list[dict]) -> list[int]:
        if self.llm.chat_format is None:
            raise APIError(400, f"model {self.name} has no chat format; use the completions endpoint",
                           param="messages")
        return self.llm.encode_chat(messages)

    def normalize_messages(self, messages: list[dict]) -> list[dict]:
        """OpenAI messages -> {"role", "content"} dicts the chat formats take: content parts
        joined, developer as system, tool calls and results as text."""
        jinja = isinstance(self.llm.chat_format, JinjaChat)
        out = []
        for m in messages:
            role, content = m["role"], m.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text") or "" for p in content if p.get("type") == "text")
            content = content or ""
            if role == "developer":
                role = "system"
            if role == "assistant" and m.get("tool_calls"):
                calls = [{"name": c["function"]["name"], "parameters": _json_or_text(c["function"]["arguments"])}
                         for c in m["tool_calls"]]
                content = (content + "\n" if content else "") + "\n".join(json.dumps(c) for c in calls)
            if role == "tool" and not jinja:
                role, content = "user", f"Function result: {content}"
            out.append({"role": role, "content": content})
        return out

    def request(self, prompt_ids: list[int], params: SamplingParams, chat: bool, logprobs: int | None = None) -> Request:
        stop = set(self.llm.eos_ids)
        if chat:
            stop |= self.llm.chat_format.stop_ids(self.llm.tokenizer)
        return Request(prompt_ids, params, stop, on_event=lambda ev: None, logprobs=logprobs)

    def token_text(self, token: int) -> str:
        return self.llm.tokenizer.decode([token])

    def token_bytes(self, token: int) -> list[int]:
        if self._token_bytes is None:
            self._token_bytes = self.llm.tokenizer.token_bytes()
        return list(self._token_bytes[token]) if token < len(self._token_bytes) else []


def _json_or_text(arguments: str):
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def sampling_params(**fields) -> SamplingParams:
    """SamplingParams whose errors become 400s naming the field."""
    try:
        return SamplingParams(**fields)
    except HerdError as e:
        raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None
