"""Bad input gets the right status and error shape and the server keeps serving, and the OpenAPI
schema documents those statuses. Runs on stories260K (fast); the fuzzing is in test_serve_fuzz.py."""

import json
import threading
import time

import httpx
import pytest

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
    *[(chat(logit_bias={key: 1}), 400, "logit_bias") for key in ("²", "٣", "1.5", "-1", " 1", "", "9" * 5000)],
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
    error = openai_error(post(server, "/v1/chat/completions", content=b'{"model": "s", "messages": [', json=None), 400)
    assert error["param"] is None
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
    # the web chat's page and files load without the key, which the page then asks for
    for path in ("/", "/static/chat.js", "/static/markdown.js", "/static/chat.css"):
        assert httpx.get(server + path).status_code == 200, path
    r = post(server, "/v1/chat/completions", chat(temperature=0))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


LONE = "\ud800"  # a lone surrogate: valid JSON ("\\ud800"), not Unicode
NOT_UNICODE = [
    ("/v1/completions", {"model": "s", "prompt": LONE}, "prompt"),
    ("/v1/completions", {"model": "s", "prompt": ["Once", "a" + LONE]}, "prompt"),
    ("/v1/completions", {"model": "s", "prompt": "Once", "stop": ["\udfff"]}, "stop"),
    ("/v1/completions", {"model": "s", "prompt": "Once", "suffix": LONE}, "suffix"),
    ("/v1/completions", {"model": "s", "prompt": "Once", "stream": True, "user": LONE}, "user"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": LONE}]), "messages.0.content"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "text", "text": LONE}]}]),
     "messages.0.content.0.text"),
    ("/v1/chat/completions", chat(messages=[{"role": "system", "content": "x" + LONE}, {"role": "user", "content": "hi"}]),
     "messages.0.content"),
    ("/v1/chat/completions", chat(stream=True, tools=[{"type": "function", "function": {"name": "f", "description": LONE}}]),
     "tools.0.function.description"),
    ("/v1/chat/completions", chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "description": LONE}}}), "response_format.json_schema.schema"),
    ("/api/generate", {"model": "s", "prompt": LONE, "stream": False}, None),
    ("/api/generate", {"model": "s", "prompt": "Once", "system": LONE}, None),
    ("/api/generate", {"model": "s", "prompt": "Once", "raw": True, "options": {"stop": [LONE]}}, None),
    ("/api/chat", {"model": "s", "messages": [{"role": "user", "content": LONE}], "stream": False}, None),
    ("/api/chat", {"model": "s", "messages": [{"role": "user", "content": LONE}]}, None),
    ("/v1/moderations", {"input": LONE}, "input"),
]


@pytest.mark.parametrize("path,body,param", NOT_UNICODE)
def test_text_that_is_not_unicode_gets_400_on_every_route(server, path, body, param):
    r = httpx.post(server + path, content=json.dumps({"max_tokens": 2, **body}).encode(), timeout=60,
                   headers={"Authorization": "Bearer k", "Content-Type": "application/json"})
    if path.startswith("/api/"):
        assert r.status_code == 400 and "surrogate" in r.json()["error"], r.text
    else:
        assert "surrogate" in openai_error(r, 400, param)["message"]


def test_values_nested_too_deep_get_400(server):
    """What reads a JSON schema recurses once per level: a deep one must not reach it."""
    deep = {"type": "integer"}
    for _ in range(400):
        deep = {"type": "array", "items": deep}
    r = post(server, "/api/generate", {"model": "s", "prompt": "Once", "format": deep, "stream": False})
    assert r.status_code == 400 and "nested" in r.json()["error"], r.text
    tools = [{"type": "function", "function": {"name": "f", "parameters": deep}}]
    assert "nested" in openai_error(post(server, "/v1/chat/completions", chat(tools=tools)), 400,
                                    "tools.0.function.parameters")["message"]


def test_surrogate_pairs_and_other_odd_text_are_fine(server):
    for text in ("\ud83d\ude00", "a\x00b", "\u202eevil\u202c", "\ufeff", "\U0010ffff"):
        r = httpx.post(server + "/v1/completions", content=json.dumps({"model": "s", "prompt": text, "max_tokens": 2})
                       .encode(), headers={"Authorization": "Bearer k", "Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 200, (text, r.text)


def test_a_request_that_can_never_fit_gets_400_not_429(stories):
    """n choices (times the prompts) beyond every slot and queue place: waiting would never help."""
    with running(create_app(Engine(stories, max_batch=1, ctx=64, max_queue=1), name="s")) as url:
        def complete(**fields):
            return httpx.post(url + "/v1/completions", json={"model": "s", "max_tokens": 2, **fields}, timeout=60)

        r = complete(prompt="Once", n=3)
        assert "Retry-After" not in r.headers
        openai_error(r, 400, "n")
        openai_error(complete(prompt=["Once", "Twice", "Thrice"]), 400, "n")
        for _ in range(10):  # one runs, one waits: never a 429, however soon the engine takes the first
            r = complete(prompt="Once", n=2)
            assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text


def test_the_openapi_schema_documents_the_codes_returned(server):
    schema = httpx.get(server + "/openapi.json").json()
    responses = {(path, method): set(op["responses"]) for path, item in schema["paths"].items()
                 for method, op in item.items()}
    assert not [op for op, codes in responses.items() if "422" in codes]
    for path in ("/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate"):
        assert responses[path, "post"] == {"200", "400", "401", "404", "413", "429", "503"}, path
    assert responses["/v1/models", "get"] == {"200", "401"}
    assert responses["/health", "get"] == {"200"}
    metrics = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain; version=0.0.4"]
    chat_error = schema["paths"]["/v1/chat/completions"]["post"]["responses"]["400"]["content"]["application/json"]
    ollama_error = schema["paths"]["/api/chat"]["post"]["responses"]["400"]["content"]["application/json"]
    assert chat_error != ollama_error


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
