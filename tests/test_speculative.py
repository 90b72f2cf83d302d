"""Speculative decoding: token-for-token equal to greedy decoding (prompt lookup and a draft
model), more than one token per step on repetitive text, and an acceptance rule that leaves the
sampled distribution unchanged."""

import subprocess
import sys

import pytest
import torch

import herd
from herd.errors import HerdError
from herd.generate import SamplingParams
from herd.generate.speculative import PromptLookup, accept, speculative_decode
from herd.llm import LLM
from herd.quant import native

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village,",
    "red green blue\nred green blue\nred green",
    "Q: What is 12 times 12?\nA:",
    "import numpy as np\nimport torch\nimport",
    "The three primary colors are",
    "1, 2, 3, 4, 5, 6, 7,",
    "To make a cup of tea, first",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n    def",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return herd.load(smollm2_gguf)


def fresh(llm: LLM) -> LLM:
    return LLM(llm.model, llm.tokenizer, llm.chat_format, llm.eos_ids)


@pytest.fixture(scope="module")
def greedy(smollm2):
    """Plain greedy outputs, computed once per prompt."""
    return {p: fresh(smollm2).generate(p, max_tokens=16, temperature=0) for p in PROMPTS}


@pytest.mark.skipif(native.library() is None, reason="exact equality needs the native decode step")
@pytest.mark.parametrize("drafter, n", [("lookup", 10), ("draft", 2), pytest.param("draft", 10, marks=pytest.mark.slow)])
def test_greedy_equality(smollm2, smollm2_gguf, greedy, drafter, n):
    if drafter == "lookup":
        llm = fresh(smollm2).speculate(lookup=True)
    else:  # a different, cheaper model
        llm = fresh(smollm2).speculate(draft=herd.load(smollm2_gguf, quantize="int4", group_size=128), tokens=4)
    prompts = PROMPTS[:n]
    assert [llm.generate(p, max_tokens=16, temperature=0) for p in prompts] == [greedy[p] for p in prompts]


CODE = ("def area(width, height):\n    result = width * height\n    return result\n\n\n"
        "def perimeter(width, height):\n    result = 2 * (width + height)\n    return result\n")
EDIT = f"Rename the function area to rectangle_area in this code and return the whole code:\n\n```python\n{CODE}```"


def test_lookup_accepts_several_tokens_per_step(smollm2):
    """A code edit mostly copies its input: prompt lookup drafts it."""
    llm = fresh(smollm2)
    ids = llm.encode_chat([{"role": "user", "content": EDIT}])
    stops = llm.eos_ids | llm.chat_format.stop_ids(llm.tokenizer)
    (seq,) = llm.sequences([ids], SamplingParams(max_tokens=48, temperature=0), stops)
    rounds = sum(1 for _ in speculative_decode(llm.model, seq, PromptLookup(), k=5)) - 1  # the first is prefill
    assert "def perimeter" in seq.text
    assert (len(seq.output_ids) - 1) / rounds > 1.5, (len(seq.output_ids), rounds)


def test_lookup_drafts():
    lookup = PromptLookup(max_ngram=3)
    assert lookup.draft([5, 6, 7, 8, 9, 5, 6, 7], 3)[0] == [8, 9, 5]
    assert lookup.draft([1, 2, 3, 4], 3)[0] == []  # nothing repeats
    assert lookup.draft([1, 2, 1, 3, 1], 2)[0] == [3, 1]  # the latest earlier occurrence wins


@pytest.mark.parametrize("q", [torch.tensor([0.1, 0.6, 0.1, 0.2]), None])
def test_acceptance_rule_keeps_the_target_distribution(q):
    """Proposals from q (or always token 1, as prompt lookup proposes), kept or replaced by the
    rule: the tokens that come out are distributed as p."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.2, 0.1])
    n, counts = 20000, torch.zeros(4)
    for _ in range(n):
        d = 1 if q is None else int(torch.multinomial(q, 1, generator=gen))
        token = accept(p, q, d, gen)
        counts[d if token is None else token] += 1
    assert (counts / n - p).abs().max() < 0.015  # 4 standard deviations


def test_sampled_speculation_runs_and_stops(smollm2):
    llm = fresh(smollm2).speculate(lookup=True)
    text = llm.generate(PROMPTS[3], max_tokens=30, temperature=0.8, seed=1, stop=["blue"])
    assert "blue" not in text
    again = llm.generate(PROMPTS[3], max_tokens=30, temperature=0.8, seed=1, stop=["blue"])
    assert text == again  # the seed still decides the output


def test_speculate_errors(smollm2, shared):
    with pytest.raises(HerdError, match="not both"):
        fresh(smollm2).speculate(draft=smollm2, lookup=True)
    stories = herd.load(shared("models", "stories260K", "stories260K.bin"))
    with pytest.raises(HerdError, match="tokenizer"):
        fresh(smollm2).speculate(draft=stories)


def test_generate_lookup_command(smollm2_gguf, greedy):
    r = subprocess.run([sys.executable, "-m", "herd", "generate", "-t", "0", "-n", "16", "--lookup", "--draft-tokens",
                        "3", PROMPTS[3]], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == greedy[PROMPTS[3]] + "\n"
    r = subprocess.run([sys.executable, "-m", "herd", "generate", "--lookup", "--draft", "x", "hi"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "not allowed with" in r.stderr and len(r.stderr.strip().splitlines()) == 1
