"""Many clients at once on loopback: 32 concurrent streams, batching seen in /metrics, and a
client that leaves mid-stream freeing its slot."""

import asyncio
import json
import re
import time

import httpx
import pytest

from herd.engine import Engine
from herd.serve import create_app
from serving import running

PROMPTS = ["Name a fruit.", "Name a colour.", "Name an animal.", "Name a country."]


@pytest.fixture(scope="module")
def server(smollm2_llm):
    engine = Engine(smollm2_llm, max_batch=16, ctx=256)
    with running(create_app(engine, name="m")) as url:
        yield url


def body(prompt, **extra):
    return {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": 10, "temperature": 0,
            **extra}


async def stream_chat(client, url, prompt):
    text, reason = "", None
    async with client.stream("POST", url + "/v1/chat/completions", json=body(prompt, stream=True)) as r:
        assert r.status_code == 200
        lines = [line async for line in r.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line.removeprefix("data: "))
        text += chunk["choices"][0]["delta"].get("content") or ""
        reason = chunk["choices"][0]["finish_reason"] or reason
    return text, reason


def metric(text, name):
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_32_concurrent_streaming_clients(server):
    expected = {p: httpx.post(server + "/v1/chat/completions", json=body(p), timeout=60).json()["choices"][0]
                for p in PROMPTS}

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(stream_chat(client, server, PROMPTS[i % 4]) for i in range(32)))

    results = asyncio.run(main())
    for i, (text, reason) in enumerate(results):
        want = expected[PROMPTS[i % 4]]
        assert (text, reason) == (want["message"]["content"], want["finish_reason"])
    metrics = httpx.get(server + "/metrics").text
    steps = metric(metrics, "herd_batch_size_count")
    single = metric(metrics, 'herd_batch_size_bucket{le="1.0"}')
    assert steps > 0 and single < steps  # most steps ran more than one sequence
    assert metric(metrics, "herd_batch_size_sum") / steps > 4
    assert metric(metrics, 'herd_requests_total{finish_reason="stop"}') + metric(
        metrics, 'herd_requests_total{finish_reason="length"}') >= 36
    for name in ("herd_queue_depth", "herd_running_requests", "herd_time_to_first_token_seconds_count",
                 "herd_time_per_output_token_seconds_count", "herd_prompt_tokens_total",
                 "herd_generation_tokens_total"):
        assert re.search(rf"^{name}", metrics, re.M), name


def test_a_client_leaving_mid_stream_frees_its_slot(server):
    free = httpx.get(server + "/health").json()["slots"]
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", server + "/v1/chat/completions",
                           json=body("Tell me a very long story.", stream=True, max_tokens=200)) as r:
            lines = r.iter_lines()
            next(lines), next(lines)
            assert httpx.get(server + "/health").json()["free_slots"] == free - 1
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 5
    while httpx.get(server + "/health").json()["free_slots"] != free:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.05)
    metrics = httpx.get(server + "/metrics").text
    assert metric(metrics, 'herd_requests_total{finish_reason="cancelled"}') >= 1
