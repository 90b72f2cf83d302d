"""What both APIs share: the served model's identity, prompts from messages, and engine requests
from sampling fields."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends
from fastapi import Request as HTTPRequest

from herd.engine import Engine, Request
from herd.errors import HerdError
from herd.generate import SamplingParams
from herd.serve.bridge import run_requests, started
from herd.serve.errors import APIError
from herd.serve.tools import prompt_ids


# Tokens a reply may have when its request sets no limit (`herd serve --max-tokens`): without one,
# a small model that never says its end token runs until the context is full (SmolLM2: minutes).
DEFAULT_MAX_TOKENS = 1024


class Service:
    def __init__(self, engine: Engine, name: str | None = None, moderator=None,
                 max_tokens: int = DEFAULT_MAX_TOKENS):
        self.engine = engine
        self.max_tokens = max_tokens  # a reply's limit when its request gives none
        self.moderator = moderator  # a serve.moderation.Moderator screening requests and replies, or None
        self.llm = engine.llm
        self.name = name or self.llm.name or "herd"
        self.created = int(time.time())
        self._token_bytes: list[bytes] | None = None

    @property
    def models(self) -> list[str]:
        """The served model names: the base model and each LoRA adapter (`herd serve --lora`)."""
        return [self.name, *self.llm.adapters]

    def check_model(self, model: str) -> str | None:
        """The adapter a request for `model` decodes with (None: the base model)."""
        name = model.removesuffix(":latest")
        if name in self.llm.adapters:
            return name
        if name != self.name:
            raise APIError(404, f"model {model!r} does not exist; this server serves "
                                f"{', '.join(map(repr, self.models))}", param="model", code="model_not_found")
        return None

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The prompt of a chat, with `tools` (OpenAI-shaped) offered to the model."""
        if self.llm.chat_format is None:
            raise APIError(400, f"model {self.name} has no chat format; use the completions endpoint",
                           param="messages")
        return prompt_ids(self.llm, messages, tools)

    def normalize_messages(self, messages: list[dict]) -> list[dict]:
        """OpenAI messages as the chat formats take them: content parts joined into a string,
        developer as system."""
        out = []
        for m in messages:
            m = dict(m)
            if isinstance(m.get("content"), list):
                m["content"] = "".join(p.get("text") or "" for p in m["content"] if p.get("type") == "text")
            if m["role"] == "developer":
                m["role"] = "system"
            out.append(m)
        return out

    def request(self, prompt_ids: list[int], params: SamplingParams, chat: bool, logprobs: int | None = None,
                stop_ids: set[int] | None = None, adapter: str | None = None) -> Request:
        stop = set(self.llm.eos_ids) if stop_ids is None else set(stop_ids)
        if chat:
            stop |= self.llm.chat_format.stop_ids(self.llm.tokenizer)
        return Request(prompt_ids, params, stop, on_event=lambda ev: None, logprobs=logprobs, adapter=adapter)

    async def start(self, requests: list[Request], http: HTTPRequest, stream: bool) -> AsyncIterator:
        """Submit `requests` (one HTTP request's choices): their events, the first awaited now so
        that a refused request still gets its status code. A whole (not streamed) reply polls
        for the client leaving, which nothing else would notice while it waits."""
        return await started(run_requests(self.engine, requests, None if stream else http.is_disconnected))

    def token_text(self, token: int) -> str:
        return self.llm.tokenizer.decode([token])

    def token_bytes(self, token: int) -> list[int]:
        if self._token_bytes is None:
            self._token_bytes = self.llm.tokenizer.token_bytes()
        return list(self._token_bytes[token]) if token < len(self._token_bytes) else []


def served(http: HTTPRequest) -> Service:
    """The Service of the app answering `http`: what a route handler takes as `svc: ServiceDep`."""
    return http.app.state.service


ServiceDep = Annotated[Service, Depends(served)]


def sampling_params(**fields) -> SamplingParams:
    """SamplingParams whose errors become 400s naming the field."""
    try:
        return SamplingParams(**fields)
    except HerdError as e:
        raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None
