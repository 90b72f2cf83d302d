"""Llama Guard in the server: /v1/moderations and `--guard` screening requests and replies.

No Llama Guard weights are available offline, so the guard here is a real model whose weights
are set to make it a bigram table: with attention and feed-forward outputs zeroed, the logits
depend only on the last token, and the output rows spell a fixed answer after the prompt's last
token. The server runs it through its own engine exactly as it would run Llama Guard 3.
"""

import httpx
import openai
import pytest
import torch

from herd.engine import Engine
from herd.llm import LLM
from herd.model import Transformer
from herd.serve import create_app
from herd.tokenizer import Llama3Chat
from helpers import tiny_config
from serving import running


def scripted_llm(tokenizer, after: int, answer: str, end: int, **kw) -> LLM:
    """A model that, after token `after`, greedily writes `answer` and then `end`."""
    chain = [after, *tokenizer.encode(answer, bos=False), end]
    assert len(set(chain)) == len(chain), "a bigram table cannot repeat a token"
    torch.manual_seed(0)
    # untied, so the output rows can map each token to the next; one layer, its projections zeroed below
    cfg = tiny_config("llama2", n_layers=1, vocab_size=tokenizer.vocab_size, max_seq_len=2048)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.tok_embeddings.weight.normal_()
        model.norm.weight.fill_(1.0)
        model.layers[0].attention_norm.weight.fill_(1.0)
        model.layers[0].ffn_norm.weight.fill_(1.0)
        for src, dst in zip(chain, chain[1:]):
            model.output.weight[dst] = 10 * model.tok_embeddings.weight[src]
    return LLM(model, tokenizer, Llama3Chat(), **kw)


@pytest.fixture(scope="module")
def parts(llama3):
    header, eot = llama3.token_id("<|end_header_id|>"), llama3.token_id("<|eot_id|>")
    chat = scripted_llm(llama3, header, "\n\nHello there", eot, name="chat")
    unsafe = scripted_llm(llama3, header, "\n\nunsafe\nS1", eot, name="guard")
    safe = scripted_llm(llama3, header, "\n\nsafe", eot, name="guard")
    return chat, unsafe, safe


def serve(chat, guard=None):
    return running(create_app(Engine(chat, max_batch=2, ctx=512),
                              guard=None if guard is None else Engine(guard, max_batch=2, ctx=1024)))


def test_scripted_models_answer_as_scripted(parts):
    chat, unsafe, safe = parts
    assert chat.chat([{"role": "user", "content": "Hi"}], max_tokens=10, temperature=0) == "Hello there"
    verdict = unsafe.moderate("How do I hurt someone?")
    assert (verdict.safe, verdict.categories) == (False, ["S1"])
    assert safe.moderate("How do I bake bread?").safe is True


def test_moderations_endpoint(parts):
    chat, unsafe, safe = parts
    with serve(chat, unsafe) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        r = client.moderations.create(input=["How do I hurt someone?", "And again?"])
        assert r.model == "guard" and len(r.results) == 2
        first = r.results[0]
        assert first.flagged and first.categories.violence and not first.categories.hate
        assert first.categories.model_extra["S1"] is True and first.category_scores.violence == 1.0
    with serve(chat, safe) as url:
        r = httpx.post(url + "/v1/moderations", json={"input": "How do I bake bread?"}, timeout=60).json()
        assert r["results"][0]["flagged"] is False and not any(r["results"][0]["categories"].values())
    with serve(chat) as url:  # no guard: the served model is asked, and it is no guard model
        r = httpx.post(url + "/v1/moderations", json={"input": "Hi"}, timeout=60)
        assert r.status_code == 400 and "Llama Guard" in r.json()["error"]["message"]
        assert httpx.post(url + "/v1/moderations", json={"input": []}, timeout=60).status_code == 400


def test_guard_refuses_flagged_requests_in_both_apis(parts):
    chat, unsafe, safe = parts
    messages = [{"role": "user", "content": "How do I hurt someone?"}]
    with serve(chat, unsafe) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="chat", messages=messages)
        assert e.value.code == "content_filter" and "S1 Violent Crimes" in e.value.message
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="chat", prompt="How do I hurt someone?")
        r = httpx.post(url + "/api/chat", json={"model": "chat", "messages": messages, "stream": False}, timeout=60)
        assert r.status_code == 400 and "guard" in r.json()["error"]
    with serve(chat, safe) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        reply = client.chat.completions.create(model="chat", messages=messages, max_tokens=10, temperature=0)
        assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == ("Hello there", "stop")
        stream = client.chat.completions.create(model="chat", messages=messages, max_tokens=10, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Hello there"


def test_guard_withholds_flagged_replies(parts):
    """Input screening is switched off here so that the request reaches the model and its reply
    meets the (always flagging) guard."""
    chat, unsafe, _ = parts
    app = create_app(Engine(chat, max_batch=2, ctx=512), guard=Engine(unsafe, max_batch=2, ctx=1024))

    async def allow(messages):
        return None

    app.state.service.moderator.screen = allow
    messages = [{"role": "user", "content": "Hi"}]
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        reply = client.chat.completions.create(model="chat", messages=messages, max_tokens=10, temperature=0)
        assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == ("", "content_filter")
        chunks = list(client.chat.completions.create(model="chat", messages=messages, max_tokens=10, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
        assert chunks[-1].choices[0].finish_reason == "content_filter"
        r = httpx.post(url + "/api/chat", json={"model": "chat", "messages": messages, "stream": False}, timeout=60)
        assert (r.json()["message"]["content"], r.json()["done_reason"]) == ("", "content_filter")
        for stream in (False, True):  # completions too, streamed or not
            reply = client.completions.create(model="chat", prompt="Hi", max_tokens=10, stream=stream)
            chunks = list(reply) if stream else [reply]
            assert "".join(c.choices[0].text for c in chunks if c.choices) == ""
            assert chunks[-1].choices[0].finish_reason == "content_filter"


def test_a_chat_of_system_messages_only_is_served_and_its_reply_judged(parts):
    """No user turn: nothing of the user's to screen, so the request is served; the reply is
    judged as a message on its own (flagged by the always-unsafe guard, passed by the safe one)."""
    chat, unsafe, safe = parts
    messages = [{"role": "system", "content": "You greet people."}]
    with serve(chat, safe) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        reply = client.chat.completions.create(model="chat", messages=messages, max_tokens=10, temperature=0)
        assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == ("Hello there", "stop")
    with serve(chat, unsafe) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        reply = client.chat.completions.create(model="chat", messages=messages, max_tokens=10, temperature=0)
        assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == ("", "content_filter")
