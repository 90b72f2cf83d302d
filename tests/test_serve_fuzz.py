"""No request body gets a server error (5xx), on stories260K (fast):

- schemathesis over the server's OpenAPI schema, with the served model's name put into every
  generated body so that generation is reached, and with the status codes and content types
  checked against what the schema documents;
- a property test that puts arbitrary Unicode (lone surrogates, NUL, right-to-left marks, huge
  strings) and arbitrary JSON values into every field of every generation route, found by walking
  the schema, and arbitrary bytes and JSON documents in place of the whole body.

The default run is bounded to about a minute; `-m slow` runs the longer versions."""

import functools
import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import content_type_conformance, not_a_server_error, status_code_conformance

import herd
from herd.engine import Engine
from herd.serve import create_app
from conftest import require_shared
from serving import running

KEY = "k"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance]
BASES = {
    "/v1/chat/completions": {"model": "s", "messages": [{"role": "user", "content": "Once"}], "max_tokens": 3},
    "/v1/completions": {"model": "s", "prompt": "Once", "max_tokens": 3},
    "/api/generate": {"model": "s", "prompt": "Once", "stream": False, "options": {"num_predict": 3}},
    "/api/chat": {"model": "s", "messages": [{"role": "user", "content": "Once"}], "stream": False,
                  "options": {"num_predict": 3}},
    "/v1/moderations": {"input": "Once"},
}


@pytest.fixture(scope="module")
def server():
    llm = herd.load(require_shared("models", "stories260K", "stories260K.gguf"))
    app = create_app(Engine(llm, max_batch=4, ctx=64), name="s", api_key=KEY, max_body=1 << 16)
    with running(app) as url:
        yield url


def bounded(body):
    """`body` for the served model ("s"), asking for little work: generation is reached, fast."""
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        body["model"] = "s"
        for key, most in (("n", 2), ("max_tokens", 8), ("max_completion_tokens", 8)):
            if type(body.get(key)) is int and body[key] > most:
                body[key] = most
        options = body.get("options")
        if isinstance(options, dict) and type(options.get("num_predict")) is int:
            options["num_predict"] = min(options["num_predict"], 8)
    return body


def openapi(server, coverage: bool):
    schema = schemathesis.openapi.from_url(server + "/openapi.json")
    schema.config.phases.coverage.enabled = coverage
    schema.hook("map_body")(lambda ctx, body: bounded(body))
    schema.hook("map_path_parameters")(lambda ctx, params: params and {**params, "model_id": "s"})  # /v1/models/s
    return schema


@pytest.fixture(scope="module")
def api_schema(server):
    """Random cases only: fast enough for the default run."""
    return openapi(server, coverage=False)


@pytest.fixture(scope="module")
def api_schema_boundaries(server):
    """Schemathesis' coverage phase too: every field's boundary and wrong-type values."""
    return openapi(server, coverage=True)


fuzz = schemathesis.pytest.from_fixture("api_schema")
fuzz_boundaries = schemathesis.pytest.from_fixture("api_schema_boundaries")


@fuzz.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_schemathesis_finds_no_server_error_and_no_undocumented_status(case):
    case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, timeout=60, checks=CHECKS)


@pytest.mark.slow
@fuzz_boundaries.parametrize()
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
def test_schemathesis_boundary_values_find_no_server_error(case):
    case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, timeout=60, checks=CHECKS)


# ---- arbitrary values in every field ----------------------------------------------------------

SPECIAL = ["\ud800", "\udfff", "a\udc00b", "\ud83d\ude00", "\x00", "a\x00b", "\u202eevil\u202c", "\u200f\u05d0",
           "\ufeff", "\U0010ffff", "\ufffd", "<s>", "</s>", "[INST]", "<|im_end|>", "{{ x }}", "{% for %}",
           "", " ", "²", "٣", "1.5", "-1"]
TEXT = (st.text(st.characters(), max_size=40) | st.sampled_from(SPECIAL) | st.just(70_000).map("x".__mul__)
        | st.text(st.characters() | st.characters(categories=["Cs"]), max_size=8))  # lone surrogates
NUMBERS = (st.integers() | st.sampled_from([2**31, 2**63, -(2**63) - 1, 10**400])
           | st.floats(allow_nan=True, allow_infinity=True))
DEEP = st.integers(20, 400).map(lambda n: functools.reduce(lambda v, _: {"type": "array", "items": v}, range(n), {}))
JSON = st.recursive(st.none() | st.booleans() | NUMBERS | TEXT | DEEP,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=8)


def resolve(schema: dict, node: dict) -> dict:
    ref = node.get("$ref")
    return schema["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else node


def field_paths(schema: dict, node: dict, path: tuple = ()) -> dict[tuple, bool]:
    """Every field under `node` of the OpenAPI `schema`, as a path of keys (a list's items as 0),
    and whether it takes text."""
    paths = {}
    for variant in map(lambda v: resolve(schema, v), resolve(schema, node).get("anyOf", [node])):
        for key, sub in variant.get("properties", {}).items():
            paths[path + (key,)] = False
            paths |= field_paths(schema, sub, path + (key,))
        if "items" in variant:
            paths |= field_paths(schema, variant["items"], path + (0,))
        if variant.get("type") == "string" and path:
            paths[path] = True
    return paths


@pytest.fixture(scope="module")
def fields(server):
    """{route: {every field path of its body: whether it takes text}}, for the generation routes."""
    schema = httpx.get(server + "/openapi.json").json()
    return {route: field_paths(schema, schema["paths"][route]["post"]["requestBody"]["content"]["application/json"]
                               ["schema"]) for route in BASES}


def put(body: dict, path: tuple, value) -> None:
    """body[path[0]][path[1]]... = value, making (or replacing) the containers on the way."""
    node = body
    for key, after in zip(path, path[1:]):
        kind = list if isinstance(after, int) else dict
        child = node[key] if (key in node if isinstance(node, dict) else len(node) > key) else None
        if not isinstance(child, kind):
            child = kind()
            _set(node, key, child)
        node = child
    _set(node, path[-1], value)


def _set(node, key, value) -> None:
    if isinstance(node, list):
        node[key:key + 1] = [value]
    else:
        node[key] = value


def send(server: str, route: str, content: bytes) -> httpx.Response:
    return httpx.post(server + route, content=content, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})


def check(route: str, r: httpx.Response) -> None:
    """No 5xx, an error in the API's own shape, and no failure inside a stream either."""
    assert r.status_code < 500, (route, r.status_code, r.text[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error, str) if route.startswith("/api/") else isinstance(error["message"], str), r.text
    assert not stream_errors(r), r.text[:300]


def stream_errors(r: httpx.Response) -> list:
    """The error objects in a streamed reply (server-sent events or NDJSON)."""
    kind = r.headers.get("content-type", "")
    lines = [line.removeprefix("data: ") for line in r.text.splitlines() if line.strip()]
    if "event-stream" not in kind and "ndjson" not in kind:
        return []
    return [item["error"] for item in map(json.loads, filter(lambda line: line != "[DONE]", lines)) if "error" in item]


def fuzz_fields(server, fields, data):
    route = data.draw(st.sampled_from(list(BASES)), label="route")
    body = json.loads(json.dumps(BASES[route]))
    for path in data.draw(st.lists(st.sampled_from(list(fields[route])), min_size=1, max_size=3), label="fields"):
        put(body, path, data.draw(TEXT | JSON if fields[route][path] else JSON, label=repr(path)))
    check(route, send(server, route, json.dumps(body).encode()))  # \u-escaped: surrogates travel as clients send them


@given(data=st.data())
@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_value_in_any_field_gets_no_server_error(server, fields, data):
    fuzz_fields(server, fields, data)


@pytest.mark.slow
@given(data=st.data())
@settings(max_examples=5000, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_value_in_any_field_gets_no_server_error_long(server, fields, data):
    fuzz_fields(server, fields, data)


@given(route=st.sampled_from(list(BASES)),
       content=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_body_gets_no_server_error(server, route, content):
    check(route, send(server, route, content))
