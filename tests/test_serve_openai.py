"""The official `openai` and `ollama` clients against herd serve (SmolLM2-135M-Instruct)."""

import json

import jsonschema
import pytest

from herd.engine import Engine
from herd.serve import create_app
from serving import running

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")


@pytest.fixture(scope="module")
def server(smollm2_llm):
    engine = Engine(smollm2_llm, max_batch=8, ctx=1024)
    with running(create_app(engine, api_key="sekret", name="smollm2")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="sekret", max_retries=0)


USER = [{"role": "user", "content": "Name the capital city of France."}]


def test_models(client):
    assert [m.id for m in client.models.list()] == ["smollm2"]
    assert client.models.retrieve("smollm2").id == "smollm2"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat(client):
    r = client.chat.completions.create(model="smollm2", messages=USER, max_tokens=12, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_matches_the_reply_and_ends_with_usage(client):
    plain = client.chat.completions.create(model="smollm2", messages=USER, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="smollm2", messages=USER, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_stream_and_not(client):
    r = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True))
    assert r.choices[0].text == streamed and "Paris" in streamed
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    echo = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8,
                                     temperature=0, echo=True)
    assert echo.choices[0].text == "The capital of France is" + streamed


def test_n_2_gives_two_choices(client):
    r = client.chat.completions.create(model="smollm2", messages=USER, max_tokens=8, n=2, temperature=1.0, seed=1)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content != r.choices[1].message.content
    assert 2 <= r.usage.completion_tokens <= 16  # both choices counted
    stream = list(client.chat.completions.create(model="smollm2", messages=USER, max_tokens=4, n=2, stream=True))
    assert {c.choices[0].index for c in stream} == {0, 1}


def test_stop_string(client):
    r = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])
    assert r.choices[0].text.startswith(" 5, 6,") and "7" not in r.choices[0].text
    assert r.choices[0].finish_reason == "stop"


def test_seed_reproducible(client):
    def ask():
        return client.chat.completions.create(model="smollm2", messages=USER, max_tokens=10, temperature=1.2,
                                              seed=1234).choices[0].message.content
    first = ask()
    assert ask() == first
    other = client.chat.completions.create(model="smollm2", messages=USER, max_tokens=10, temperature=1.2, seed=99)
    assert other.choices[0].message.content != first


def test_logprobs(client):
    r = client.chat.completions.create(model="smollm2", messages=USER, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token  # greedy: the likeliest
        assert t.logprob <= 0 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert bytes(t.bytes).decode() == t.token
    c = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=3, temperature=0,
                                  logprobs=2)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text and len(lp.top_logprobs[0]) == 2
    assert lp.text_offset[0] == 0


SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                           "population": {"type": "integer", "minimum": 0},
                                           "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 30},
                                                         "maxItems": 3}},
          "required": ["city", "population", "landmarks"], "additionalProperties": False}


def test_response_format_json_schema(client):
    for seed in (1, 2):
        r = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Describe Paris as JSON."}], max_tokens=120,
            temperature=0.7, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    r = client.chat.completions.create(model="smollm2", messages=USER, max_tokens=60, temperature=0,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}}, "required": ["zone"]}}}


def test_tool_choice_forcing_a_function(client):
    messages = [{"role": "user", "content": "What is the weather like in Paris?"}]
    r = client.chat.completions.create(model="smollm2", messages=messages, tools=[TIME, WEATHER], temperature=0,
                                       max_tokens=80, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    stream = list(client.chat.completions.create(
        model="smollm2", messages=messages, tools=[TIME, WEATHER], temperature=0, max_tokens=80, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    calls = [tc for c in stream if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert calls[0].function.name == "get_weather"
    assert "".join(tc.function.arguments or "" for tc in calls) == call.function.arguments
    assert stream[-1].choices[0].finish_reason == "tool_calls"

    r = client.chat.completions.create(model="smollm2", messages=messages, tools=[TIME, WEATHER], temperature=0,
                                       max_tokens=80, tool_choice="required")
    assert r.choices[0].message.tool_calls[0].function.name in ("get_weather", "get_time")
    # the call and its result go back in the conversation
    messages += [r.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": r.choices[0].message.tool_calls[0].id, "content": "22 C, sunny"}]
    r = client.chat.completions.create(model="smollm2", messages=messages, tools=[TIME, WEATHER], max_tokens=20,
                                       temperature=0, tool_choice="none")
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


def test_ollama_generate_and_chat(server):
    c = ollama.Client(host=server, headers={"Authorization": "Bearer sekret"})
    options = {"temperature": 0, "num_predict": 10}
    r = c.generate(model="smollm2", prompt="Name the capital city of France.", options=options)
    assert "Paris" in r.response and r.done and 0 < r.eval_count <= 10 and r.done_reason in ("stop", "length")
    streamed = list(c.generate(model="smollm2", prompt="Name the capital city of France.", options=options, stream=True))
    assert "".join(p.response for p in streamed) == r.response and streamed[-1].done
    messages = [{"role": "user", "content": "Name the capital city of France."}]
    r = c.chat(model="smollm2", messages=messages, options=options)
    assert "Paris" in r.message.content and r.message.role == "assistant"
    streamed = list(c.chat(model="smollm2", messages=messages, options=options, stream=True))
    assert "".join(p.message.content for p in streamed) == r.message.content
    assert streamed[-1].done and streamed[-1].prompt_eval_count > 5
    r = c.chat(model="smollm2", messages=messages, options={"seed": 5, "stop": ["."], "num_predict": 30, "top_k": 20})
    assert "." not in r.message.content
    assert [m.model for m in c.list().models] == ["smollm2"]
    assert c.show("smollm2").modelinfo["llama.block_count"] == 30
    with pytest.raises(ollama.ResponseError) as e:
        c.chat(model="llama3", messages=messages)
    assert e.value.status_code == 404


def test_tools_go_into_the_system_message_of_a_template_without_tools(smollm2_llm):
    from herd.serve import tools as toolcalls

    assert not toolcalls.knows_tools(smollm2_llm)  # SmolLM2's ChatML template ignores `tools`
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "22 C"}]
    text = smollm2_llm.tokenizer.decode(toolcalls.prompt_ids(smollm2_llm, history, [WEATHER]))
    assert text.startswith("<|im_start|>system\nYou have access to the following functions.")
    assert '"name": "get_weather"' in text and '"description": "Current weather in a city"' in text
    assert '<|im_start|>assistant\n{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}' in text
    assert "<|im_start|>tool\n22 C<|im_end|>" in text
    content, calls = toolcalls.read_reply('{"name": "get_weather", "parameters": {"city": "Oslo"}}',
                                          [WEATHER["function"]])
    assert content is None and calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert toolcalls.read_reply('{"name": "launch", "parameters": {}}', [WEATHER["function"]])[1] == []
