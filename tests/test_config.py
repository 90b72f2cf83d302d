import pytest

from herd.config import CONFIGS, ModelConfig, get_config
from herd.errors import HerdError

# Parameter counts as published by the model makers (rounded as they state them).
PUBLISHED = {
    "llama-2-7b": 6.74e9, "llama-2-13b": 13.02e9, "llama-2-70b": 68.98e9,
    "llama-3-8b": 8.03e9, "llama-3.1-70b": 70.55e9, "llama-3.1-405b": 405.85e9,
    "llama-3.2-1b": 1.24e9, "llama-3.2-3b": 3.21e9, "tinyllama-1.1b": 1.10e9,
    "smollm2-135m": 134.5e6, "smollm2-360m": 361.8e6, "smollm2-1.7b": 1.71e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_published(name):
    assert get_config(name).num_params() == pytest.approx(PUBLISHED[name], rel=5e-3)


def test_every_config_is_consistent():
    for name, cfg in CONFIGS.items():
        assert cfg.name == name
        assert cfg.dim == cfg.n_heads * cfg.head_dim
        assert cfg.n_heads % cfg.n_kv_heads == 0


def test_llama31_rope_scaling_and_tied_32():
    c = get_config("llama-3.1-8b")
    assert c.rope_scaling.factor == 8 and c.rope_scaling.original_max_position == 8192 and c.max_seq_len == 131072
    c = get_config("Llama-3.2-1B")
    assert c.tie_embeddings and c.rope_scaling.factor == 32


def test_get_config_returns_a_copy():
    get_config("stories15m").dim = 1
    assert get_config("stories15m").dim == 288


def test_bad_configs_are_rejected():
    with pytest.raises(HerdError, match="unknown model config"):
        get_config("llama-9")
    with pytest.raises(HerdError, match="not divisible"):
        ModelConfig(dim=100, n_layers=1, n_heads=3, vocab_size=10, hidden_dim=10)
    with pytest.raises(HerdError, match="n_kv_heads"):
        ModelConfig(dim=64, n_layers=1, n_heads=8, vocab_size=10, hidden_dim=10, n_kv_heads=3)
    with pytest.raises(HerdError, match="n_layers"):
        ModelConfig(dim=64, n_layers=0, n_heads=8, vocab_size=10, hidden_dim=10)
