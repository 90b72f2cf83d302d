"""The static-shape decode step (herd.generate.static) against the eager forward: the same greedy
tokens, for rows of different lengths in batch buckets that pad, on Llama 2, 3 and 4 shapes."""

from __future__ import annotations

import pytest
import torch

from herd.errors import HerdError
from herd.generate.static import StaticDecoder, bucket_for, greedy
from herd.model import Transformer
from helpers import TINY_CONFIGS, spread_init, tiny_config


@torch.no_grad()
def eager_greedy(model: Transformer, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens from the full causal forward, no cache: the reference."""
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("family", TINY_CONFIGS)
@pytest.mark.parametrize("rows", [1, 3])  # 3 rows run in a bucket of 4: one row of padding
def test_static_greedy_equals_eager(family, rows):
    torch.manual_seed(0)
    model = spread_init(Transformer(tiny_config(family))).eval()
    prompts = [torch.randint(0, 200, (n,)).tolist() for n in (5, 11, 2)[:rows]]
    got = greedy(model, prompts, 32)
    assert got == [eager_greedy(model, p, 32) for p in prompts]


def test_buckets():
    assert [bucket_for(n) for n in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 128]
    with pytest.raises(HerdError, match="largest batch bucket"):
        bucket_for(10_000)


def test_static_step_keeps_shapes_and_bounds():
    model = Transformer(tiny_config("llama2")).eval()
    decoder = StaticDecoder(model, rows=2, max_seq_len=8)
    with pytest.raises(HerdError, match="leaves no room"):
        decoder.prefill([[1] * 8])
    decoder.prefill([[1, 2, 3], [4]])
    for _ in range(5):
        assert decoder.step().shape == (2,)
    with pytest.raises(HerdError, match="is full"):
        decoder.step()


@pytest.mark.slow
def test_compiled_static_step_on_cpu():
    torch.manual_seed(0)
    model = spread_init(Transformer(tiny_config("llama3"))).eval()
    prompts = [[5, 6, 7], [8, 9]]
    assert greedy(model, prompts, 12, compile=True) == [eager_greedy(model, p, 12) for p in prompts]
