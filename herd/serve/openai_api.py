"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions, with streaming
(server-sent events ending in `data: [DONE]`), n choices, logprobs, JSON-schema response formats
and tool calls, shaped as OpenAI's own responses."""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from herd.engine import EngineStopped
from herd.errors import HerdError
from herd.generate.json_bounds import json_object
from herd.serve.errors import APIError, from_herd_error, responses
from herd.serve.moderation import screened
from herd.serve.schemas import ChatCompletionRequest, CompletionRequest, ResponseFormat, Sampling
from herd.serve.service import Service, ServiceDep, sampling_params
from herd.serve.tools import call_schema, read_reply


def json_schema_of(fmt: ResponseFormat | None) -> dict | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return json_object()
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(400, "response_format.json_schema.schema is required for type json_schema",
                       param="response_format.json_schema.schema")
    return fmt.json_schema.schema_


def params_for(body: Sampling, max_tokens: int, schema: dict | None, choice: int):
    logit_bias = {int(key): bias for key, bias in (body.logit_bias or {}).items()}  # keys checked by the schema
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or not all(stop):
        raise APIError(400, "stop: at most 4 non-empty strings", param="stop")
    return sampling_params(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        min_p=body.min_p, presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty, seed=None if body.seed is None else body.seed + choice,
        stop=stop, logit_bias=logit_bias, json_schema=schema)


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(data) -> str:
    return f"data: {json.dumps(data)}\n\n"


def sse_error(message: str, code: str | None = None) -> str:
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": code}})


# What a generation route answers: JSON, or with "stream": true server-sent events; or an error.
GENERATION = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}},
              **responses(400, 404, 413, 429, 503)}


router = APIRouter()


def _model_card(svc: Service, name: str) -> dict:
    return {"id": name, "object": "model", "created": svc.created, "owned_by": "herd"}


@router.get("/v1/models")
async def list_models(svc: ServiceDep):
    return {"object": "list", "data": [_model_card(svc, name) for name in svc.models]}


@router.get("/v1/models/{model_id:path}", responses=responses(404))
async def get_model(model_id: str, svc: ServiceDep):
    return _model_card(svc, svc.check_model(model_id) or svc.name)


def _head(svc: Service, adapter: str | None, id_prefix: str, kind: str) -> dict:
    """The fields every object of a reply (or chunk of a stream) starts with."""
    return {"id": f"{id_prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
            "model": adapter or svc.name, "system_fingerprint": "herd"}


def _tool_use(body: ChatCompletionRequest) -> tuple[list[dict], list[dict], dict | None]:
    """From a chat request's tools and tool_choice: the functions offered, those the reply may
    call, and the JSON schema its reply must match (a call, when one is required)."""
    functions = [t.function.model_dump(exclude_none=True) for t in body.tools or []]
    choice = body.tool_choice or ("auto" if functions else "none")
    schema = json_schema_of(body.response_format)
    if choice != "none" and not functions:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    called = functions
    if not isinstance(choice, str):
        called = [f for f in functions if f["name"] == choice.function.name]
        if not called:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not in tools",
                           param="tool_choice")
    if choice not in ("none", "auto"):
        schema = call_schema(called)
    return functions, called if choice != "none" else [], schema


@router.post("/v1/chat/completions", responses=GENERATION)
async def chat_completions(body: ChatCompletionRequest, http: Request, svc: ServiceDep):
    adapter = svc.check_model(body.model)
    messages = svc.normalize_messages([m.model_dump(exclude_none=True) for m in body.messages])
    functions, calling, schema = _tool_use(body)
    if svc.moderator is not None:
        await svc.moderator.screen(messages)
    try:
        ids = svc.chat_ids(messages, [{"type": "function", "function": f} for f in functions] or None)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        limit = body.max_completion_tokens or body.max_tokens or svc.max_tokens
        requests = [svc.request(ids, params_for(body, limit, schema, i), chat=True, logprobs=logprobs, adapter=adapter)
                    for i in range(body.n)]
    except HerdError as e:
        raise from_herd_error(e) from None
    head = _head(svc, adapter, "chatcmpl", "chat.completion.chunk")
    events = await svc.start(requests, http, body.stream)
    replies = screened(events, svc.moderator, [messages] * body.n, hold=bool(calling))
    if body.stream:
        return StreamingResponse(_until_shutdown(_chat_stream(svc, replies, head, body, calling, len(ids))),
                                 media_type="text/event-stream")
    return await _chat_reply(svc, replies, head, body, calling, len(ids))


@router.post("/v1/completions", responses=GENERATION)
async def completions(body: CompletionRequest, http: Request, svc: ServiceDep):
    adapter = svc.check_model(body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    schema = json_schema_of(body.response_format)
    if svc.moderator is not None:
        for p in prompts:
            await svc.moderator.screen([{"role": "user", "content": p}])
    try:
        if body.suffix is not None:  # Code Llama infilling: the model writes what goes between
            encoded = [svc.llm.encode_infill(p, body.suffix) for p in prompts]
            stop = svc.llm.infill_stop_ids()
        else:
            encoded = [svc.llm.encode(p) for p in prompts]
            stop = None
        requests = [svc.request(ids, params_for(body, body.max_tokens or svc.max_tokens, schema, i), chat=False,
                                logprobs=body.logprobs, stop_ids=stop, adapter=adapter)
                    for ids in encoded for i in range(body.n)]
    except HerdError as e:
        raise from_herd_error(e) from None
    n_prompt = sum(len(ids) for ids in encoded)
    head = _head(svc, adapter, "cmpl", "text_completion")
    events = await svc.start(requests, http, body.stream)
    choice_prompts = [prompts[k // body.n] for k in range(len(requests))]
    replies = screened(events, svc.moderator, [[{"role": "user", "content": p}] for p in choice_prompts])
    if body.stream:
        echoes = [p if body.echo else "" for p in choice_prompts]
        return StreamingResponse(_until_shutdown(_completion_stream(svc, replies, head, body, n_prompt, echoes)),
                                 media_type="text/event-stream")
    return await _completion_reply(svc, replies, head, body, n_prompt, choice_prompts)


async def _until_shutdown(chunks):
    """`chunks`, or when the server shuts down mid-stream, those sent so far, an error event
    saying so and [DONE]: the end of a failed stream that OpenAI's clients understand."""
    try:
        async for chunk in chunks:
            yield chunk
    except EngineStopped as e:
        yield sse_error(str(e), "shutting_down")
        yield "data: [DONE]\n\n"


async def _collect(replies, n: int):
    """Run `n` choices to the end (`replies` from moderation.screened): their texts,
    log-probabilities, finish reasons, and the number of tokens generated in all."""
    texts, reasons = [""] * n, [None] * n
    lps: list[list] = [[] for _ in range(n)]
    completion = 0
    async for i, ev, text, reason in replies:
        texts[i] += text
        lps[i] += ev.logprobs or []
        completion += len(ev.tokens)
        reasons[i] = reason or reasons[i]
        if reason == "content_filter":  # the flagged reply's tokens are not shown either
            lps[i] = []
    return texts, lps, reasons, completion


async def _completion_reply(svc: Service, replies, head, body: CompletionRequest, n_prompt: int,
                            prompts: list[str]) -> dict:
    """The whole reply to a completions request; `prompts`: each choice's prompt."""
    texts, lps, reasons, completion = await _collect(replies, len(prompts))
    if body.echo:  # a flagged reply shows nothing, not even its prompt
        texts = [text if reason == "content_filter" else prompt + text
                 for prompt, text, reason in zip(prompts, texts, reasons)]
    choices = [{"index": i, "text": texts[i], "finish_reason": reasons[i],
                "logprobs": _completion_logprobs(svc, lps[i], len(prompts[i]) if body.echo else 0)
                if body.logprobs is not None else None}
               for i in range(len(prompts))]
    return {**head, "choices": choices, "usage": usage(n_prompt, completion)}


def _chat_logprobs(svc: Service, lps) -> dict:
    def entry(token, lp):
        return {"token": svc.token_text(token), "logprob": lp, "bytes": svc.token_bytes(token)}

    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(tok, lp) for tok, lp in t.top]}
                        for t in lps], "refusal": None}


def _completion_logprobs(svc: Service, lps, offset: int) -> dict:
    tokens = [svc.token_text(t.token) for t in lps]
    offsets, at = [], offset
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": [{svc.token_text(tok): lp for tok, lp in t.top} for t in lps], "text_offset": offsets}


def _tool_message(text: str, tools: list[dict]) -> tuple[dict, bool]:
    """The assistant message for `text`, and whether it is a tool call."""
    content, calls = read_reply(text, tools) if tools else (text, [])
    message = {"role": "assistant", "content": content, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    return message, bool(calls)


async def _chat_reply(svc: Service, replies, head, body: ChatCompletionRequest, tools, n_prompt) -> dict:
    texts, lps, reasons, completion = await _collect(replies, body.n)
    choices = []
    for i in range(body.n):
        message, called = _tool_message(texts[i], tools)
        reason = "tool_calls" if called and reasons[i] == "stop" else reasons[i]
        choices.append({"index": i, "message": message, "finish_reason": reason,
                        "logprobs": _chat_logprobs(svc, lps[i]) if body.logprobs else None})
    return {**head, "object": "chat.completion", "choices": choices, "usage": usage(n_prompt, completion)}


async def _chat_stream(svc: Service, replies, head, body: ChatCompletionRequest, tools, n_prompt):
    """A chat reply's server-sent events. A reply held back (tools, a guard) shows no log-probabilities."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    extra = {"usage": None} if include_usage else {}
    completion = 0
    held = bool(tools) or svc.moderator is not None

    def chunk(i, delta, reason=None, logprobs=None):
        return sse({**head, "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}],
                    **extra})

    for i in range(body.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    try:
        async for i, ev, text, reason in replies:
            completion += len(ev.tokens)
            logprobs = _chat_logprobs(svc, ev.logprobs) if body.logprobs and ev.logprobs and not held else None
            message, called = _tool_message(text, tools) if reason and tools else ({}, False)
            if called:
                yield chunk(i, {"tool_calls": [{"index": 0, **c} for c in message["tool_calls"]]})
                reason, text = "tool_calls" if reason == "stop" else reason, ""
            if text or logprobs:
                yield chunk(i, {"content": text}, logprobs=logprobs)
            if reason:
                yield chunk(i, {}, reason)
    except APIError as e:  # a failed generation, or a guard that failed
        yield sse_error(e.message, e.code)
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage(n_prompt, completion)})
    yield "data: [DONE]\n\n"


async def _completion_stream(svc: Service, replies, head, body: CompletionRequest, n_prompt, echoes):
    """A completion's server-sent events. A reply held back for a guard shows no log-probabilities."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    extra = {"usage": None} if include_usage else {}
    completion = 0
    held = svc.moderator is not None
    offsets = {i: len(echo) for i, echo in enumerate(echoes)}
    for i, echo in enumerate(echoes):
        if echo:
            yield sse({**head, "choices": [{"index": i, "text": echo, "logprobs": None, "finish_reason": None}],
                       **extra})
    try:
        async for i, ev, text, reason in replies:
            completion += len(ev.tokens)
            logprobs = None
            if body.logprobs is not None and ev.logprobs and not held:
                logprobs = _completion_logprobs(svc, ev.logprobs, offsets.get(i, 0))
                offsets[i] = offsets.get(i, 0) + sum(len(t) for t in logprobs["tokens"])
            if text or logprobs or reason:
                yield sse({**head, "choices": [{"index": i, "text": text, "logprobs": logprobs,
                                                "finish_reason": reason}], **extra})
    except APIError as e:  # a failed generation, or a guard that failed
        yield sse_error(e.message, e.code)
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage(n_prompt, completion)})
    yield "data: [DONE]\n\n"

