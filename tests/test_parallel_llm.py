"""herd.load(..., tp=2) from the Python API: plain batched greedy decoding, speculative decoding
(prompt lookup and a draft model) and constrained JSON give what one process gives, on the real
stories260K GGUF; LoRA adapters are refused in one line."""

from __future__ import annotations

import pytest

import herd
from herd import parallel
from herd.errors import HerdError

PROMPTS = ["Once upon a time", "Lily saw a big dog. The dog"]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


@pytest.fixture(scope="module")
def pair(shared_stories):
    one, two = herd.load(shared_stories), herd.load(shared_stories, tp=2)
    yield one, two
    parallel.stop()


@pytest.fixture(scope="module")
def shared_stories():
    from conftest import require_shared

    return require_shared("models", "stories260K", "stories260K.gguf")


def test_batched_greedy_text_is_one_process_text(pair):
    one, two = pair
    expected = one.generate(PROMPTS, max_tokens=48, temperature=0)
    assert two.generate(PROMPTS, max_tokens=48, temperature=0) == expected
    assert all(len(t) > 40 for t in expected)


@pytest.mark.parametrize("how", ["lookup", "draft"])
def test_speculative_decoding_keeps_the_greedy_text(pair, how):
    one, two = pair
    expected = one.generate(PROMPTS[0], max_tokens=48, temperature=0)
    two.speculate(lookup=True) if how == "lookup" else two.speculate(draft=one)  # the draft runs on rank 0
    try:
        assert two.generate(PROMPTS[0], max_tokens=48, temperature=0) == expected
    finally:
        two.drafter = None


def test_constrained_json_is_one_process_json(pair):
    one, two = pair
    options = {"json_schema": SCHEMA, "max_tokens": 200, "temperature": 1.0, "seed": 0}  # as test_engine_constrained
    expected = one.generate(PROMPTS[0], **options)
    assert two.generate(PROMPTS[0], **options) == expected
    assert expected.startswith('{"') and len(expected) > 40  # held to the schema (it may end at max_tokens)


def test_lora_adapters_are_refused(pair, tmp_path):
    with pytest.raises(HerdError, match="LoRA adapters are not supported with tensor parallelism"):
        pair[1].load_adapters({"a": tmp_path})
