"""Ollama-compatible routes: /api/generate and /api/chat (NDJSON streaming), /api/tags,
/api/show, /api/version, with Ollama's `options`."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from functools import cache

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

import herd
from herd.engine import EngineStopped
from herd.errors import HerdError
from herd.generate import SamplingParams
from herd.generate.json_bounds import json_object
from herd.serve.errors import APIError, from_herd_error, responses
from herd.serve.moderation import screened
from herd.serve.schemas import OllamaChat, OllamaGenerate, OllamaOptions, OllamaShow
from herd.serve.service import Service, ServiceDep, sampling_params


# What a generation route answers: JSON, or with "stream": true (the default) lines of JSON; or an error.
GENERATION = {200: {"content": {"application/x-ndjson": {"schema": {"type": "string"}}}},
              **responses(400, 404, 413, 429, 503, ollama=True)}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _details(svc: Service) -> dict:
    return {"parent_model": "", "format": "gguf" if svc.name.endswith("gguf") else "herd", "family": "llama",
            "families": ["llama"], "parameter_size": f"{svc.llm.config.num_params() / 1e6:.0f}M",
            "quantization_level": ""}


def _params(svc: Service, options: OllamaOptions | None, fmt, n_prompt: int) -> SamplingParams:
    """Ollama's options, with Ollama's defaults, as sampling parameters for a prompt of `n_prompt` tokens."""
    o = options or OllamaOptions()
    ctx = min(o.num_ctx or svc.engine.ctx, svc.engine.ctx)
    if n_prompt >= ctx:
        raise APIError(400, f"the prompt is {n_prompt} tokens but the context is {ctx} tokens")
    room = ctx - n_prompt
    if o.num_predict is None or o.num_predict == 0:  # unset: the server's default limit
        max_tokens = min(svc.max_tokens, room)
    else:  # -1: until the end token, -2: until the context is full; either way the room left
        max_tokens = room if o.num_predict in (-1, -2) else min(o.num_predict, room)
    schema = json_object() if fmt == "json" else fmt
    return sampling_params(
        max_tokens=max_tokens, temperature=0.8 if o.temperature is None else o.temperature,
        top_k=40 if o.top_k is None else o.top_k, top_p=0.9 if o.top_p is None else o.top_p,
        min_p=o.min_p or 0.0, seed=o.seed, stop=o.stop or [],
        repetition_penalty=1.1 if o.repeat_penalty is None else o.repeat_penalty,
        presence_penalty=o.presence_penalty or 0.0, frequency_penalty=o.frequency_penalty or 0.0,
        json_schema=schema)


def _done(reply: dict, reason: str, n_prompt: int, n_out: int, start: int) -> dict:
    """The last object of a reply: `reply` (the route's shape) with the counts and timings."""
    took = time.perf_counter_ns() - start
    return {**reply, "done": True, "done_reason": reason, "total_duration": took, "load_duration": 0,
            "prompt_eval_count": n_prompt, "prompt_eval_duration": 0, "eval_count": n_out, "eval_duration": took}


async def _respond(svc: Service, ids: list[int], body, chat: bool, http: Request, shape, messages: list[dict]):
    """Run one request; `shape` makes a reply object of a text; `messages` is the conversation as
    the guard (if any) screens it."""
    if svc.moderator is not None:
        await svc.moderator.screen(messages)
    try:
        request = svc.request(ids, _params(svc, body.options, body.format, len(ids)), chat=chat,
                              adapter=svc.check_model(body.model))
    except HerdError as e:
        raise from_herd_error(e) from None
    start = time.perf_counter_ns()
    events = await svc.start([request], http, body.stream)
    replies = screened(events, svc.moderator, [messages])
    if body.stream:
        return StreamingResponse(_lines(replies, shape, len(ids), start), media_type="application/x-ndjson")
    text, n_out, reason = "", 0, "stop"
    async for _, ev, piece, finish in replies:
        text += piece
        n_out += len(ev.tokens)
        reason = finish or reason
    return _done(shape(text), reason, len(ids), n_out, start)


async def _lines(replies, shape, n_prompt: int, start: int):
    """A streamed reply's NDJSON lines. A failure, or the server's shutdown, ends the stream with
    an {"error"} line, which Ollama's clients raise."""
    n_out = 0
    try:
        async for _, ev, text, reason in replies:
            n_out += len(ev.tokens)
            if text:
                yield json.dumps({**shape(text), "done": False}) + "\n"
            if reason:
                yield json.dumps(_done(shape(""), reason, n_prompt, n_out, start)) + "\n"
    except (APIError, EngineStopped) as e:
        yield json.dumps({"error": str(e)}) + "\n"


router = APIRouter()


@router.post("/api/generate", responses=GENERATION)
async def generate(body: OllamaGenerate, http: Request, svc: ServiceDep):
    svc.check_model(body.model)
    if not body.prompt and not body.system:
        return {"model": body.model, "created_at": _now(), "response": "", "done": True, "done_reason": "load"}
    system = [{"role": "system", "content": body.system}] if body.system else []
    messages = system + [{"role": "user", "content": body.prompt}]
    try:
        if body.raw or svc.llm.chat_format is None:
            ids = svc.llm.encode(body.prompt)
        else:
            ids = svc.chat_ids(messages)
    except HerdError as e:
        raise from_herd_error(e) from None
    chat = not body.raw and svc.llm.chat_format is not None
    return await _respond(svc, ids, body, chat, http,
                          lambda text: {"model": body.model, "created_at": _now(), "response": text}, messages)


@router.post("/api/chat", responses=GENERATION)
async def chat(body: OllamaChat, http: Request, svc: ServiceDep):
    svc.check_model(body.model)
    if not body.messages:
        return {"model": body.model, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                "done": True, "done_reason": "load"}
    messages = svc.normalize_messages([m.model_dump() for m in body.messages])
    try:
        ids = svc.chat_ids(messages)
    except HerdError as e:
        raise from_herd_error(e) from None
    return await _respond(svc, ids, body, True, http, lambda text: {
        "model": body.model, "created_at": _now(), "message": {"role": "assistant", "content": text}}, messages)


@cache
def _size(svc: Service) -> int:
    """Bytes of the served weights, packed or not: summed once, not on every /api/tags."""
    return sum(t.numel() * t.element_size() for t in svc.llm.model.state_dict().values())


@router.get("/api/tags")
async def tags(svc: ServiceDep):
    details = _details(svc)
    return {"models": [{"name": name, "model": name, "modified_at": _now(), "size": _size(svc), "digest": "",
                        "details": details} for name in svc.models]}


@router.post("/api/show", responses=responses(400, 404, 413, ollama=True))
async def show(body: OllamaShow, svc: ServiceDep):
    name = body.model or body.name
    if not name:
        raise APIError(400, "model is required", param="model")
    svc.check_model(name)
    cfg = svc.llm.config
    info = {"general.architecture": "llama", "general.parameter_count": cfg.num_params(),
            "llama.context_length": cfg.max_seq_len, "llama.embedding_length": cfg.dim,
            "llama.block_count": cfg.n_layers, "llama.attention.head_count": cfg.n_heads,
            "llama.attention.head_count_kv": cfg.n_kv_heads, "llama.feed_forward_length": cfg.hidden_dim,
            "llama.rope.freq_base": cfg.rope_theta, "llama.vocab_size": cfg.vocab_size}
    return {"modelfile": f"FROM {svc.name}\n", "parameters": f"num_ctx {svc.engine.ctx}",
            "template": svc.llm.tokenizer.chat_template or "", "details": _details(svc), "model_info": info,
            "capabilities": ["completion"], "modified_at": _now()}


@router.get("/api/version")
async def version():
    return {"version": herd.__version__}
