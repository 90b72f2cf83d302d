"""Forced tool calls and json_object replies end: the tool shapes real clients send (OpenAI's
documentation, LangChain's `convert_to_openai_tool`, pydantic's schemas), through the official
`openai` and `ollama` clients against herd serve on SmolLM2-135M-Instruct; and the bounds that
make them end, read off the grammar's token masks over SmolLM2's real vocabulary."""

import json

import jsonschema
import pytest
from pydantic import BaseModel, Field

from herd.engine import Engine
from herd.generate.constrained import JsonConstraint
from herd.generate.json_bounds import MAX_DEPTH, MAX_ITEMS, MAX_KEY, MAX_KEYS, closed, json_object
from herd.serve import create_app
from herd.serve.tools import call_schema
from serving import running

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

# OpenAI's function-calling guide (Chat Completions), as most clients still send it: no
# additionalProperties, so any other key is valid too.
WEATHER = {"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["location"]}}}


def langchain_tools() -> list[dict]:
    """LangChain agent tools, converted by LangChain itself."""
    core = pytest.importorskip("langchain_core.tools")
    convert = pytest.importorskip("langchain_core.utils.function_calling").convert_to_openai_tool

    @core.tool
    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    @core.tool
    def web_search(query: str, max_results: int = 5) -> str:
        """Search the web for a query."""
        return ""

    class Attendee(BaseModel):
        name: str = Field(description="full name")
        email: str | None = None

    @core.tool
    def create_event(title: str, attendees: list[Attendee], duration_minutes: int = 30) -> str:
        """Create a calendar event."""
        return ""

    return [convert(t) for t in (multiply, web_search, create_event)]


class Booking(BaseModel):
    """A pydantic model's own schema: titles, and the nested model in $defs behind a $ref."""
    class Guest(BaseModel):
        name: str
        nights: int

    hotel: str
    guest: Guest
    breakfast: bool = False


BOOKING = {"type": "function", "function": {"name": "book_hotel", "description": "Book a hotel room",
                                            "parameters": Booking.model_json_schema()}}


@pytest.fixture(scope="module")
def server(smollm2_llm):
    with running(create_app(Engine(smollm2_llm, max_batch=4, ctx=1024), name="smollm2")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)


def forced(client, question: str, tools: list[dict], choice, **kw):
    return client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": question}],
                                          tools=tools, tool_choice=choice, temperature=0, max_tokens=150, **kw)


def named(tool: dict) -> dict:
    return {"type": "function", "function": {"name": tool["function"]["name"]}}


def check_call(choice, tools: list[dict]):
    """The choice is a whole call to one of `tools` with only declared arguments; its arguments."""
    assert choice.finish_reason == "tool_calls", choice
    assert not choice.message.content
    (call,) = choice.message.tool_calls
    (tool,) = [t for t in tools if t["function"]["name"] == call.function.name]
    schema = tool["function"]["parameters"]
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, schema)
    assert set(arguments) <= set(schema["properties"]) and set(schema.get("required", [])) <= set(arguments)
    return arguments


def test_forced_calls_with_openai_docs_tool_end(client):
    for choice in ("required", named(WEATHER)):
        r = forced(client, "What's the weather like in Boston today?", [WEATHER], choice)
        check_call(r.choices[0], [WEATHER])
        assert r.usage.completion_tokens < 60
    stream = list(client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What's the weather like in Boston today?"}],
        tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=150, stream=True))
    calls = [tc for c in stream if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert calls[0].function.name == "get_current_weather" and stream[-1].choices[0].finish_reason == "tool_calls"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls))["location"]


def test_forced_calls_with_langchain_tools_end(client):
    tools = langchain_tools()
    multiply, search, event = tools
    arguments = check_call(forced(client, "What is 3 times 12?", tools, named(multiply)).choices[0], tools)
    assert set(arguments) == {"a", "b"}
    check_call(forced(client, "Who won the 2022 world cup?", tools, named(search)).choices[0], tools)
    check_call(forced(client, "Set up a meeting with Ann about the budget.", tools, named(event)).choices[0], tools)
    check_call(forced(client, "Who won the 2022 world cup?", tools, "required").choices[0], tools)


def test_forced_call_with_a_pydantic_schema_and_refs_ends(client):
    arguments = check_call(forced(client, "Book me a room at the Ritz for two nights, I am Ann.", [BOOKING],
                                  "required").choices[0], [BOOKING])
    assert set(arguments["guest"]) == {"name", "nights"}


SQUARES = [{"role": "user", "content": "Give a JSON object mapping numbers to their squares."}]


def test_json_object_ends(client, server):
    # before the bounds, SmolLM2 wrote [1,1,1,...] until max_tokens
    r = client.chat.completions.create(model="smollm2", messages=SQUARES, temperature=0, max_tokens=120,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    reply = ollama.Client(host=server).chat(model="smollm2", messages=SQUARES, format="json",
                                            options={"temperature": 0, "num_predict": 120})
    assert reply.done_reason == "stop" and isinstance(json.loads(reply.message.content), dict)


# ---- the bounds, read off the grammar --------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    from herd.checkpoint.gguf_file import read_gguf_metadata
    from herd.tokenizer.from_gguf import tokenizer_from_gguf

    return tokenizer_from_gguf(read_gguf_metadata(smollm2_gguf))


def next_texts(tokenizer, schema: dict, text: str) -> set[str]:
    """The texts of the tokens the grammar of `schema` allows after `text`."""
    constraint = JsonConstraint(tokenizer, schema)
    for token in tokenizer.encode(text):
        constraint.accept(token)
    allowed = constraint.allowed(tokenizer.vocab_size).nonzero().flatten().tolist()
    return {tokenizer.decode([t]) for t in allowed}


def test_declared_properties_only_and_required_first(tokenizer):
    params = WEATHER["function"]["parameters"]
    assert "," in next_texts(tokenizer, params, '{"location":"Boston","unit":"celsius"')  # today's schema
    assert next_texts(tokenizer, closed(params), '{"location":"Boston","unit":"celsius"') == {"}"}
    later_first = {**params, "properties": dict(reversed(params["properties"].items()))}
    assert list(later_first["properties"]) == ["unit", "location"]
    assert list(closed(later_first)["properties"]) == ["location", "unit"]
    # a schema that says what other keys hold keeps them
    open_ = {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "string"}}
    assert closed(open_) == open_
    # and an integer holds at most 16 digits
    digits = {"type": "object", "properties": {"n": {"type": "integer"}}}
    assert next_texts(tokenizer, closed(digits), '{"n":' + "1" * 15) & {"1", "0"}
    assert next_texts(tokenizer, closed(digits), '{"n":' + "1" * 16) == {"}"}


def test_call_schema_keeps_each_tools_references(tokenizer):
    schema = call_schema([BOOKING["function"], WEATHER["function"]])
    call = {"name": "book_hotel", "parameters": {"hotel": "Ritz", "guest": {"name": "Ann", "nights": 2}}}
    jsonschema.validate(call, schema)
    text = json.dumps(call, separators=(",", ":"))
    after_nights = next_texts(tokenizer, schema, text[:-3])  # the $ref'd Guest: no key past its declared ones
    assert "}" in after_nights and not after_nights & {",", ',"'}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**call, "parameters": {**call["parameters"], "spa": True}}, schema)


def test_json_object_bounds(tokenizer):
    schema = json_object()
    full = "{" + ",".join(f'"k{i}":{i}' for i in range(MAX_KEYS))
    assert next_texts(tokenizer, schema, full).isdisjoint({",", ',"'})
    assert "}" in next_texts(tokenizer, schema, full)
    items = '{"a":[' + ",".join("1" for _ in range(MAX_ITEMS))
    assert "," not in next_texts(tokenizer, schema, items)
    assert all(t.startswith('"') for t in next_texts(tokenizer, schema, '{"' + "k" * MAX_KEY))
    deepest = '{"a":' * MAX_DEPTH
    assert "{" not in next_texts(tokenizer, schema, deepest) and "[" not in next_texts(tokenizer, schema, deepest)
    assert "{" in next_texts(tokenizer, schema, '{"a":' * (MAX_DEPTH - 1))
