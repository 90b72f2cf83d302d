"""Bad input gets the right status and error shape and the server keeps serving; a bounded
schemathesis run over the OpenAPI schema finds no 500. Runs on stories260K (fast)."""

import threading
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

import herd
from herd.engine import Engine
from herd.serve import create_app
from conftest import require_shared
from serving import running


@pytest.fixture(scope="module")
def stories():
    return herd.load(require_shared("models", "stories260K", "stories260K.gguf"))


@pytest.fixture(scope="module")
def server(stories):
    with running(create_app(Engine(stories, max_batch=4, ctx=64), name="s", api_key="k", max_body=1 << 16)) as url:
        yield url


def post(server, path, json=None, key="k", **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server + path, json=json, headers=headers, timeout=60, **kw)


def chat(**fields):
    return {"model": "s", "messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 4, **fields}


def openai_error(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


BAD = [
    (chat(temperature="hot"), 400, "temperature"),
    (chat(temperature=5), 400, "temperature"),
    (chat(top_p=0), 400, "top_p"),
    (chat(n=0), 400, "n"),
    (chat(max_tokens=0), 400, "max_tokens"),
    (chat(top_logprobs=50), 400, "top_logprobs"),
    (chat(messages=[]), 400, "messages"),
    (chat(messages=[{"role": "wizard", "content": "hi"}]), 400, None),
    (chat(messages="hello"), 400, "messages"),
    (chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (chat(logit_bias={"x": 1}), 400, "logit_bias"),
    (chat(logit_bias={"999999": 1}), 400, None),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 12}}}), 400, None),
    (chat(response_format={"type": "xml"}), 400, None),
    (chat(tool_choice="required"), 400, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_fields(server, body, status, param):
    openai_error(post(server, "/v1/chat/completions", body), status, param)


def test_bad_requests_of_every_kind_and_the_server_keeps_serving(server):
    openai_error(post(server, "/v1/chat/completions", content=b'{"model": "s", "messages": [', json=None), 400)
    openai_error(post(server, "/v1/chat/completions", chat(model="gpt-4")), 404, "model", "model_not_found")
    openai_error(post(server, "/v1/chat/completions", chat(), key=None), 401, code="invalid_api_key")
    openai_error(post(server, "/v1/chat/completions", chat(), key="wrong"), 401)
    long = "Once upon a time there was a little dog. " * 20
    openai_error(post(server, "/v1/completions", {"model": "s", "prompt": long}), 400, code="context_length_exceeded")
    openai_error(post(server, "/v1/completions", {"model": "s", "prompt": "x" * 100_000}), 413)
    openai_error(post(server, "/v1/completions", {"model": "s", "prompt": 5}), 400, "prompt")
    # unknown fields are ignored
    assert post(server, "/v1/chat/completions", chat(frobnicate=True, metadata={"a": 1})).status_code == 200
    # Ollama routes answer in Ollama's shape
    r = post(server, "/api/chat", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and isinstance(r.json()["error"], str)
    r = post(server, "/api/generate", {"model": "s", "prompt": "hi", "options": {"temperature": -1}})
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    r = post(server, "/api/generate", {"model": "s", "prompt": "hi"}, key=None)
    assert r.status_code == 401 and isinstance(r.json()["error"], str)
    assert httpx.get(server + "/health").status_code == 200
    r = post(server, "/v1/chat/completions", chat(temperature=0))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_a_full_queue_gets_429_with_retry_after(stories):
    engine = Engine(stories, max_batch=1, ctx=2048, max_queue=1)
    with running(create_app(engine, name="s")) as url:
        # never ends by itself: the end token is banned
        long = {"model": "s", "prompt": "Once", "max_tokens": 2000, "temperature": 1, "stream": True,
                "logit_bias": {str(stories.tokenizer.eos_id): -100}}
        with httpx.Client(timeout=60) as c, c.stream("POST", url + "/v1/completions", json=long) as first:
            lines = first.iter_lines()
            next(lines)  # holds the only slot (while `lines` lives: dropping it closes the stream)
            waiting = threading.Thread(target=httpx.post, args=(url + "/v1/completions",),
                                       kwargs={"json": {**long, "stream": False, "max_tokens": 2}, "timeout": 60})
            waiting.start()
            deadline = time.monotonic() + 30
            while engine.stats()["waiting"] == 0:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            r = httpx.post(url + "/v1/completions", json={"model": "s", "prompt": "Once", "max_tokens": 2})
            openai_error(r, 429, code="queue_full")
            assert int(r.headers["Retry-After"]) >= 1
        waiting.join(60)


@pytest.fixture(scope="module")
def api_schema(server):
    """Random fuzzing only: fast enough for the default run."""
    schema = schemathesis.openapi.from_url(server + "/openapi.json")
    schema.config.phases.coverage.enabled = False
    return schema


@pytest.fixture(scope="module")
def api_schema_boundaries(server):
    """Schemathesis' coverage phase too: every field's boundary and wrong-type values."""
    return schemathesis.openapi.from_url(server + "/openapi.json")


def check_case(case):
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        body["model"] = "s"  # past the model check, into generation, most of the time
        for key, most in (("n", 2), ("max_tokens", 8), ("max_completion_tokens", 8)):  # bounded work
            if type(body.get(key)) is int and body[key] > most:
                body[key] = most
        options = body.get("options")
        if isinstance(options, dict) and type(options.get("num_predict")) is int:
            options["num_predict"] = min(options["num_predict"], 8)
    r = case.call(headers={"Authorization": "Bearer k"}, timeout=60)
    assert r.status_code < 500, f"{case.method} {case.path} {case.body}: {r.status_code} {r.text[:300]}"


fuzz = schemathesis.pytest.from_fixture("api_schema")
fuzz_boundaries = schemathesis.pytest.from_fixture("api_schema_boundaries")


@fuzz.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_never_get_a_500(case):
    check_case(case)


@pytest.mark.slow
@fuzz_boundaries.parametrize()
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
def test_boundary_values_never_get_a_500(case):
    check_case(case)
