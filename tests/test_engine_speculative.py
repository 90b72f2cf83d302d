"""Speculative decoding in the engine on the real SmolLM2-135M-Instruct: with prompt lookup or a
draft model, greedy tokens and logprobs are bit for bit those of the engine without speculation,
alone and batched; repetitive text takes several tokens per verification; stops, limits, seeds
and JSON schemas still hold."""

import json

import pytest

from herd.engine import Engine
from herd.errors import HerdError
from herd.generate.speculative import PromptLookup, make_drafter
from herd.quant import native
from test_engine import chat_ids, run_all, sample, stop_ids

pytestmark = pytest.mark.skipif(native.library() is None, reason="exact equality needs the native decode step")

REPEAT = "Repeat this list: red, green, blue, red, green, blue, red, green, blue, red, green, blue"
TEXTS = [REPEAT, "Tell me one fact about cats.", "Write a haiku about the sea.", "What is 12 times 12?"]


@pytest.fixture(scope="module")
def prompts(smollm2_llm):
    return [chat_ids(smollm2_llm, t) for t in TEXTS]


@pytest.fixture(scope="module")
def plain(smollm2_llm):
    e = Engine(smollm2_llm, max_batch=4, ctx=512)
    yield e
    e.stop()


@pytest.fixture(scope="module")
def lookup(smollm2_llm):
    e = Engine(smollm2_llm, max_batch=4, ctx=512, drafter=PromptLookup())
    yield e
    e.stop()


@pytest.fixture(scope="module")
def expected(plain, smollm2_llm, prompts):
    """Greedy tokens and top-3 logprobs without speculation, one request at a time."""
    return [run_all(plain, smollm2_llm, [p], max_tokens=24, temperature=0, logprobs=3)[0] for p in prompts]


def counters(engine):
    return [sample(engine, f"herd_{name}_total") for name in ("draft_tokens", "draft_accepted_tokens", "verify_steps")]


def test_lookup_is_exactly_greedy_alone_and_batched(lookup, smollm2_llm, prompts, expected):
    before = counters(lookup)
    alone = run_all(lookup, smollm2_llm, prompts[:1], max_tokens=24, temperature=0, logprobs=3)
    drafted, accepted, steps = (a - b for a, b in zip(counters(lookup), before))
    assert alone == expected[:1]
    assert accepted / steps > 1, (drafted, accepted, steps)  # the repeated list is drafted from the prompt
    # several requests at once: rows with drafts verified beside the batched rows without
    assert run_all(lookup, smollm2_llm, prompts, max_tokens=24, temperature=0, logprobs=3) == expected


def test_self_drafting_model_is_exactly_greedy_and_accepted(smollm2_llm, prompts, expected):
    e = Engine(smollm2_llm, max_batch=4, ctx=512, drafter=make_drafter(smollm2_llm, smollm2_llm), draft_tokens=4)
    try:
        assert run_all(e, smollm2_llm, prompts, max_tokens=24, temperature=0, logprobs=3) == expected
        drafted, accepted, steps = counters(e)
    finally:
        e.stop()
    # the same model agrees with its own drafts; only drafts past an end token are refused
    assert accepted >= 0.9 * drafted and drafted >= 3 * steps, (drafted, accepted, steps)


def test_stops_and_limits_apply_per_token(plain, lookup, smollm2_llm, prompts):
    for params in [dict(max_tokens=7), dict(max_tokens=30, stop=[" blue, red"])]:
        want = run_all(plain, smollm2_llm, prompts[:1], temperature=0, **params)[0]
        got = run_all(lookup, smollm2_llm, prompts[:1], temperature=0, **params)[0]
        assert got == want
    assert len(got[0]) < 30 and got[2] == "stop"
    assert len(run_all(lookup, smollm2_llm, prompts[:1], temperature=0, max_tokens=7)[0][0]) == 7


def test_same_seed_same_sample_whatever_runs_beside_it(lookup, smollm2_llm, prompts):
    alone = run_all(lookup, smollm2_llm, prompts[:1], max_tokens=16, temperature=0.8, seed=3)
    crowd = run_all(lookup, smollm2_llm, [prompts[0], prompts[1], prompts[0]], max_tokens=16, temperature=0.8, seed=3)
    assert crowd[0] == alone[0] == crowd[2]


def test_json_schema_holds_under_speculation(plain, lookup, smollm2_llm):
    schema = {"type": "object", "properties": {"colors": {"type": "array", "minItems": 6, "maxItems": 8,
                                                          "items": {"type": "string"}}},
              "required": ["colors"], "additionalProperties": False}
    ids = chat_ids(smollm2_llm, REPEAT + " as a JSON list.")
    want = run_all(plain, smollm2_llm, [ids], max_tokens=40, temperature=0, json_schema=schema)[0]
    before = counters(lookup)
    got = run_all(lookup, smollm2_llm, [ids], max_tokens=40, temperature=0, json_schema=schema)[0]
    assert got == want and got[2] == "stop"
    assert counters(lookup)[1] > before[1]  # drafts were taken within the grammar
    text = smollm2_llm.tokenizer.decode([t for t in got[0] if t not in stop_ids(smollm2_llm)])
    assert len(json.loads(text)["colors"]) >= 6


def test_draft_tokens_must_be_positive(smollm2_llm):
    with pytest.raises(HerdError, match="draft_tokens must be a positive integer"):
        Engine(smollm2_llm, max_batch=1, ctx=64, drafter=PromptLookup(), draft_tokens=0)

