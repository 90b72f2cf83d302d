"""`herd serve --max-tokens N`: a reply whose request sets no limit (as the web chat's) stops
after N tokens, where before a small model ran until its context was full; a request's own limit
still wins. Through the official `openai` and `ollama` clients against the `herd serve` process."""

import pytest

from test_serve_cli import start, stop

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

# On the default model this ran 4,065 tokens (210 s) with no limit.
PIRATE = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Tell me about your ship."}]


def test_a_reply_without_a_limit_stops_at_the_servers(smollm2_gguf):
    p, url = start("-m", str(smollm2_gguf), "--max-tokens", "7")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        r = client.chat.completions.create(model=model, messages=PIRATE, temperature=0)
        assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (7, "length")
        chunks = list(client.chat.completions.create(model=model, messages=PIRATE, temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == 7
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
        r = client.chat.completions.create(model=model, messages=PIRATE, temperature=0, max_tokens=12)
        assert r.usage.completion_tokens == 12  # the request's own limit wins, above the default too
        r = client.completions.create(model=model, prompt="Once upon a time", temperature=0, max_tokens=None)
        assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (7, "length")

        c = ollama.Client(host=url)
        reply = c.chat(model=model, messages=PIRATE, options={"temperature": 0})
        assert (reply.eval_count, reply.done_reason) == (7, "length")
        assert c.chat(model=model, messages=PIRATE, options={"temperature": 0, "num_predict": 12}).eval_count == 12
    finally:
        stop(p)
