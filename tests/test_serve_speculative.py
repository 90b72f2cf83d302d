"""`herd serve --lookup` / `--draft`: the official `openai` client gets the same greedy replies as
from a server without speculation, /metrics counts drafted and accepted tokens, and bad flags are
one-line errors."""

import httpx
import pytest

from conftest import require_shared
from herd.engine import Engine
from herd.generate.speculative import PromptLookup
from herd.quant import native
from herd.serve import create_app
from serving import running
from test_engine import chat_ids, run_all, stop_ids

openai = pytest.importorskip("openai")

REPEAT = "Repeat this list: red, green, blue, red, green, blue, red, green, blue, red, green, blue"


@pytest.mark.skipif(native.library() is None, reason="exact equality needs the native decode step")
def test_openai_client_gets_the_plain_greedy_reply(smollm2_llm):
    llm = smollm2_llm
    texts = [REPEAT, "Name the capital city of France."]
    plain = Engine(llm, max_batch=2, ctx=512)
    try:
        want = []
        for tokens, _, _ in (run_all(plain, llm, [chat_ids(llm, t)], max_tokens=24, temperature=0)[0] for t in texts):
            want.append(llm.tokenizer.decode([t for t in tokens if t not in stop_ids(llm)]))
    finally:
        plain.stop()
    engine = Engine(llm, max_batch=2, ctx=512, drafter=PromptLookup(), draft_tokens=5)
    with running(create_app(engine, name="smollm2")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        got = [client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": t}],
                                              max_tokens=24, temperature=0).choices[0].message.content for t in texts]
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": REPEAT}], max_tokens=24, temperature=0,
            stream=True))
        metrics = httpx.get(url + "/metrics").text
    assert got == want and streamed == want[0]
    assert "red, green, blue" in got[0]
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line.startswith("herd_")}
    assert values["herd_draft_accepted_tokens_total"] > values["herd_verify_steps_total"] > 0


def test_bad_speculative_flags_are_one_line_errors(smollm2_gguf, capsys):
    from herd.cli import main

    stories = str(require_shared("models", "stories260K", "stories260K.gguf"))
    for args, message in [(["--lookup", "--draft-tokens", "0"], "--draft-tokens must be at least 1"),
                          (["--draft", str(smollm2_gguf)], "does not share the model's tokenizer")]:
        assert main(["serve", "-m", stories, "--port", "1", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as e:
        main(["serve", "-m", stories, "--lookup", "--draft", stories])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err
