"""Llama 4: the registry's Scout and Maverick shapes, and logits and greedy decoding against
transformers' Llama 4 text model on small random configs with mixture-of-experts layers, NoPE
layers, chunked attention, QK norm and attention temperature tuning all active."""

from __future__ import annotations

import json

import pytest
import torch

from herd.checkpoint import build_model, load_checkpoint, save_hf
from herd.config import MoE, ModelConfig, get_config
from herd.errors import HerdError
from herd.generate import SamplingParams, Sequence, run_batch
from herd.model import Transformer
from herd.model.moe import Experts

transformers = pytest.importorskip("transformers")

# 4 layers: 0 rope+dense, 1 rope+MoE, 2 NoPE+dense, 3 rope+MoE; chunks of 8 positions; the
# temperature grows every 4 positions (floor_scale 4).
SCOUT_LIKE = dict(
    vocab_size=320, hidden_size=64, intermediate_size=48, intermediate_size_mlp=96, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
    interleave_moe_layer_step=2, no_rope_layer_interval=3, attention_chunk_size=8, max_position_embeddings=256,
    use_qk_norm=True, attn_temperature_tuning=True, floor_scale=4, attn_scale=0.5, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
)
# Maverick-like: every layer MoE with one routed expert, no QK norm, plain rope, no temperature.
MAVERICK_LIKE = {**SCOUT_LIKE, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "use_qk_norm": False,
                 "no_rope_layer_interval": 2, "attn_temperature_tuning": False,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}


@torch.no_grad()
def spread(model: torch.nn.Module) -> torch.nn.Module:
    """Weights that make every part matter: unit-variance activations through each product,
    norm weights away from 1, router logits spread enough that routing is decisive."""
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.uniform_(0.5, 1.5)
        elif "embed" in name:
            p.normal_(0, 1)
        elif p.dim() == 3:  # fused experts, stored [experts, in, out]
            p.normal_(0, p.shape[1] ** -0.5)
        else:
            p.normal_(0, p.shape[1] ** -0.5)
    return model


def hf_model(fields: dict, tmp_path, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Llama4TextConfig(**fields)
    model = spread(transformers.Llama4ForCausalLM(cfg)).eval()
    model.save_pretrained(tmp_path)
    return model


def test_registry_shapes():
    scout, maverick = get_config("llama-4-scout-17b-16e"), get_config("llama-4-maverick-17b-128e")
    # Meta: 17B active parameters each; 109B total for Scout (with its vision encoder), 400B for Maverick
    for cfg in (scout, maverick):
        assert cfg.num_params(active=True) == pytest.approx(17e9, rel=0.02)
        assert [i for i in range(48) if not cfg.uses_rope(i)] == list(range(3, 48, 4))
    assert scout.num_params() == pytest.approx(109e9, rel=0.02)
    assert maverick.num_params() == pytest.approx(400e9, rel=0.01)
    assert all(scout.is_moe_layer(i) for i in range(48))
    assert [i for i in range(48) if maverick.is_moe_layer(i)] == list(range(1, 48, 2))
    assert scout.qk_norm and not maverick.qk_norm and scout.rope_scaling.factor == 16
    assert scout.moe.n_experts == 16 and maverick.moe.n_experts == 128 and scout.moe.top_k == 1


@pytest.mark.parametrize("fields", [SCOUT_LIKE, MAVERICK_LIKE], ids=["scout-like", "maverick-like"])
def test_logits_match_transformers(fields, tmp_path):
    ref = hf_model(fields, tmp_path)
    ckpt = load_checkpoint(tmp_path)
    cfg = ckpt.config
    assert cfg.family == "llama4" and cfg.attention_chunk_size == 8
    assert sum(cfg.is_moe_layer(i) for i in range(4)) >= 2 and not all(cfg.uses_rope(i) for i in range(4))
    model = build_model(ckpt).eval()
    tokens = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = ref(tokens).logits, model(tokens)
    assert expected.std() > 0.5  # logits spread: a wrong part would move them far beyond the tolerance
    assert (got - expected).abs().max() <= 1e-4


def test_every_feature_changes_the_logits(tmp_path):
    # guards the parity test against a feature that is silently inert on its config
    hf_model(SCOUT_LIKE, tmp_path)
    ckpt = load_checkpoint(tmp_path)
    base = build_model(ckpt).eval()
    tokens = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = base(tokens)
        for change in (dict(attention_chunk_size=None), dict(qk_norm=False), dict(attn_temperature=None),
                       dict(nope_layer_step=0), dict(moe=MoE(n_experts=4, hidden_dim=48, top_k=1, layer_step=2))):
            other = Transformer(ckpt.config.replace(**change))
            other.load_state_dict(base.state_dict())
            assert (other.eval()(tokens) - logits).abs().max() > 1e-2, change


def greedy_full_forward(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def greedy_cached(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=n, temperature=0)
    seqs = [Sequence(p, params, None, set(), model.config.vocab_size, limit=n) for p in prompts]
    for _ in run_batch(model, seqs, prefill_chunk=7):  # prefill chunks that straddle attention chunks
        pass
    return [s.output_ids for s in seqs]


def test_greedy_decode_with_cache_equals_full_forward_and_transformers(tmp_path):
    ref = hf_model(SCOUT_LIKE, tmp_path)
    model = build_model(load_checkpoint(tmp_path)).eval()
    prompt = [5, 17, 200, 3, 99, 42, 7, 256, 11, 64, 128, 1, 300]
    n = 16  # positions 13..28: crosses chunk boundaries 16 and 24 and temperature steps
    full = greedy_full_forward(model, prompt, n)
    assert greedy_cached(model, [prompt], n) == [full]
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                           eos_token_id=None, pad_token_id=0)
    assert out[0, len(prompt):].tolist() == full
    assert len(set(full)) > 3  # not a degenerate repetition


def test_rows_at_different_positions_decode_as_alone(tmp_path):
    hf_model(SCOUT_LIKE, tmp_path)
    model = build_model(load_checkpoint(tmp_path)).eval()
    prompts = [[9, 8, 7, 6, 5], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
    alone = [greedy_cached(model, [p], 12)[0] for p in prompts]
    assert greedy_cached(model, prompts, 12) == alone


def test_loads_the_text_model_of_a_multimodal_checkpoint(tmp_path):
    torch.manual_seed(0)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  image_size=28, patch_size=14, vision_output_dim=32, projector_input_dim=32,
                  projector_output_dim=32)
    config = transformers.Llama4Config(text_config=SCOUT_LIKE, vision_config=vision)
    full = transformers.Llama4ForConditionalGeneration(config)
    spread(full.language_model).eval()
    full.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama4"
    model = build_model(load_checkpoint(tmp_path)).eval()
    tokens = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = full.language_model(tokens).logits
        assert (model(tokens) - expected).abs().max() <= 1e-4


def test_grouped_dispatch_equals_per_token_experts():
    torch.manual_seed(0)
    experts = Experts(n_experts=6, dim=8, hidden_dim=12)
    x = torch.randn(10, 8)
    chosen = torch.tensor([[0, 1]] * 5 + [[1, 4]] * 5)  # experts 2, 3 and 5 get no tokens
    scores = torch.rand(10, 2)
    expected = torch.zeros(10, 8)
    for t in range(10):
        for j in range(2):
            e, h = int(chosen[t, j]), x[t] * scores[t, j]
            expected[t] += (torch.nn.functional.silu(h @ experts.w1[e]) * (h @ experts.w3[e])) @ experts.w2[e]
    with torch.no_grad():
        torch.testing.assert_close(experts(x, chosen, scores), expected, atol=1e-5, rtol=1e-5)


def test_config_errors(tmp_path):
    hf_model(SCOUT_LIKE, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for change, match in [
        (dict(moe_layers=[0, 3]), "moe_layers"),
        (dict(no_rope_layers=[1, 0]), "one flag per layer"),
        (dict(head_dim=8), "head_dim"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(intermediate_size_mlp=None), "intermediate_size_mlp"),
    ]:
        broken = {k: v for k, v in {**config, **change}.items() if v is not None}
        (tmp_path / "config.json").write_text(json.dumps(broken))
        with pytest.raises(HerdError, match=match):
            load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    ckpt = load_checkpoint(tmp_path)
    with pytest.raises(HerdError, match="Llama 4"):
        save_hf(ckpt.config, ckpt.state_dict, tmp_path / "out")
    with pytest.raises(HerdError, match="top_k"):
        ModelConfig(64, 2, 4, 100, 96, moe=MoE(n_experts=2, hidden_dim=8, top_k=3))
