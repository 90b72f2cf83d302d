"""Llama Guard in the server: `POST /v1/moderations`, and, with `herd serve --guard MODEL`, every
conversation screened before it reaches the model and every reply before it reaches the client.

The guard model runs on an engine of its own (a small batch), so screening never waits behind
the chat model's queue and a guard verdict is greedy and exact, as Meta runs it.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi import Request as HTTPRequest
from pydantic import Field

from herd.engine import Engine, Event, Request
from herd.errors import HerdError
from herd.generate import SamplingParams
from herd.serve.bridge import run_requests
from herd.serve.errors import APIError, from_herd_error, responses
from herd.serve.schemas import Body
from herd.tokenizer.guard import GuardVerdict, LlamaGuard3, parse_guard

# OpenAI's moderation categories and the Llama Guard 3 hazards that fall under each, so that
# OpenAI clients read a verdict in their own terms; the hazard codes are reported as well.
OPENAI_CATEGORIES = {
    "harassment": (), "harassment/threatening": (), "hate": ("S10",), "hate/threatening": (),
    "illicit": ("S2", "S3"), "illicit/violent": ("S1", "S9"), "self-harm": ("S11",), "self-harm/intent": (),
    "self-harm/instructions": (), "sexual": ("S3", "S12"), "sexual/minors": ("S4",),
    "violence": ("S1",), "violence/graphic": (),
}


class ModerationRequest(Body):
    input: str | list[str] = Field(min_length=1)
    model: str | None = None


class Moderator:
    """Verdicts of a Llama Guard 3 model served by `engine`."""

    def __init__(self, engine: Engine, name: str):
        self.engine, self.name = engine, name
        self.guard = LlamaGuard3()
        tokenizer = engine.llm.tokenizer
        self.stop_ids = engine.llm.eos_ids | self.guard.stop_ids(tokenizer)

    async def verdict(self, messages: list[dict]) -> GuardVerdict:
        """The verdict on the last turn of `messages` (user/assistant; others are left out). A
        conversation with no user or assistant turn (only system messages) holds nothing of the
        user's to judge: safe."""
        turns = _turns(messages)
        if not turns:
            return GuardVerdict(True)
        try:
            ids = self.guard.encode(self.engine.llm.tokenizer, turns)
            request = Request(ids, SamplingParams(max_tokens=20, temperature=0.0), self.stop_ids, on_event=lambda ev: None)
            text = ""
            async for _, ev, _ in run_requests(self.engine, [request]):
                if ev.finish_reason == "error":
                    raise APIError(500, f"the guard model failed: {ev.error}")
                text += ev.text
        except HerdError as e:
            raise from_herd_error(e) from None
        return parse_guard(text, self.guard.categories)

    async def screen(self, messages: list[dict]) -> None:
        """Raise a 400 (code content_filter) when the guard flags the conversation's last turn."""
        verdict = await self.verdict(messages)
        if verdict.flagged:
            raise APIError(400, f"the request was flagged by the guard model ({self.describe(verdict)})",
                           code="content_filter")

    async def flags_reply(self, messages: list[dict], reply: str) -> bool:
        """Whether the guard flags `reply` as the assistant's answer to `messages`; with no user
        turn to answer (only system messages), as a message on its own."""
        if not _turns(messages):
            return (await self.verdict([{"role": "user", "content": reply}])).flagged
        return (await self.verdict([*messages, {"role": "assistant", "content": reply}])).flagged

    def describe(self, verdict: GuardVerdict) -> str:
        return ", ".join(f"{c} {self.guard.categories.get(c, '').rstrip('.')}".strip() for c in verdict.categories) \
            or "unsafe"


def _turns(messages: list[dict]) -> list[dict]:
    """The user/assistant turns Llama Guard reads: system and tool messages left out, and
    consecutive turns of one role joined (tool-call rounds leave several assistant turns)."""
    turns: list[dict] = []
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant") or not isinstance(content, str) or not content.strip():
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1] = {"role": role, "content": turns[-1]["content"] + "\n\n" + content}
        else:
            turns.append({"role": role, "content": content})
    if turns and turns[0]["role"] == "assistant":
        turns = turns[1:]
    return turns


async def screened(events: AsyncIterator, guard: Moderator | None, conversations: list[list[dict]],
                   hold: bool = False) -> AsyncIterator[tuple[int, Event, str, str | None]]:
    """The choices' replies as a client may see them: (choice, event, text, finish reason) for each
    of `events` (from bridge.run_requests). With a guard, or `hold` (a tool call is known only
    once the reply ends), a choice's text is held back and comes whole with its finish reason;
    the guard judges it first as the answer to `conversations[choice]`, and a reply it flags
    comes as "" with finish reason "content_filter". A failed generation raises a 500."""
    hold = hold or guard is not None
    held: dict[int, str] = {}
    async for i, ev, _ in events:
        if ev.finish_reason == "error":
            raise APIError(500, f"generation failed: {ev.error}")
        text, reason = ev.text, ev.finish_reason
        if hold:
            held[i] = held.get(i, "") + text
            text = held.pop(i) if reason else ""
        if reason and guard is not None and await guard.flags_reply(conversations[i], text):
            text, reason = "", "content_filter"
        yield i, ev, text, reason


def current(http: HTTPRequest) -> Moderator:
    """The Moderator of the app answering `http`: the guard's, or the served model's."""
    return http.app.state.moderator


router = APIRouter()


@router.post("/v1/moderations", responses=responses(400, 413, 429, 503))
async def moderations(body: ModerationRequest, moderator: Annotated[Moderator, Depends(current)]):
    inputs = [body.input] if isinstance(body.input, str) else body.input
    if not all(isinstance(text, str) and text.strip() for text in inputs):
        raise APIError(400, "input: every text must be a non-empty string", param="input")
    results = []
    for text in inputs:
        verdict = await moderator.verdict([{"role": "user", "content": text}])
        if verdict.safe is None:
            raise APIError(400, f"{moderator.name} gave no verdict ({verdict.error}): moderation needs a "
                                "Llama Guard 3 model (serve one, or give --guard MODEL)", param="model")
        flagged = set(verdict.categories)
        categories = {name: bool(flagged & set(codes)) for name, codes in OPENAI_CATEGORIES.items()}
        categories |= {code: code in flagged for code in moderator.guard.categories}
        results.append({"flagged": verdict.flagged, "categories": categories,
                        "category_scores": {k: float(v) for k, v in categories.items()}})
    return {"id": f"modr-{uuid.uuid4().hex}", "model": moderator.name, "results": results}
