"""Small helpers shared by test modules."""

import math

import pytest
import torch

from herd.config import AttnTemperature, ModelConfig, MoE, RopeScaling

# One tiny shape per family: builds in milliseconds, yet each family's features are all active.
TINY_CONFIGS = {
    # multi-head attention, an untied output layer, plain rotary embeddings
    "llama2": ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=200, hidden_dim=96, max_seq_len=128),
    # grouped-query attention (4 heads on 2), tied embeddings, Llama 3.1 rope scaling with frequencies in
    # each of its bands (kept, smoothed, slowed)
    "llama3": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=200, hidden_dim=96,
                          max_seq_len=128, rope_theta=500000.0, tie_embeddings=True,
                          rope_scaling=RopeScaling(8.0, 1.0, 4.0, 128)),
    # 4 mixture-of-experts layers (one routed expert of 4), the third NoPE with temperature tuning, chunked
    # attention (8 positions) and QK norm on the others
    "llama4": ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=200, hidden_dim=96,
                          max_seq_len=128, moe=MoE(n_experts=4, hidden_dim=48, top_k=1), nope_layer_step=3,
                          attention_chunk_size=8, qk_norm=True,
                          attn_temperature=AttnTemperature(floor_scale=4, attn_scale=0.5)),
}


def tiny_config(family: str = "llama2", /, **overrides) -> ModelConfig:
    """The tiny shape of `family`, with what a test needs changed (a tokenizer's vocab_size, a longer context)."""
    return TINY_CONFIGS[family].replace(**overrides)


@torch.no_grad()
def spread_init(model: torch.nn.Module) -> torch.nn.Module:
    """Weights scaled so attention is far from uniform and logits spread over several units: a
    wrong rotary layout or a swapped tensor then moves logits by far more than test tolerances."""
    for p in model.parameters():
        if p.dim() == 2:
            p.normal_(0, 1 / math.sqrt(p.shape[1]))
        else:
            p.uniform_(0.5, 1.5)
    return model


def reference_render(template: str, messages, add_generation_prompt: bool, **context) -> str:
    """transformers' renderer: the independent reference for template output."""
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    rendered, _ = chat_template_utils.render_jinja_template(
        conversations=[messages], chat_template=template, add_generation_prompt=add_generation_prompt, **context
    )
    return rendered[0]
