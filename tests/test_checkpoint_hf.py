"""Hugging Face and Meta checkpoints against transformers: tiny random Llamas written by
transformers' save_pretrained, loaded by herd, compared logit for logit and token for token."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import spread_init

from herd.checkpoint import Checkpoint, build_model, load_checkpoint, save_hf, save_meta
from herd.checkpoint.hf import config_from_hf
from herd.checkpoint.meta import meta_ffn_params, meta_hidden_dim
from herd.config import CONFIGS, RopeScaling

transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# (a) Llama 2: multi-head attention; (b) Llama 3.1: GQA + llama3 rope scaling whose 64-token
# original context puts one of the 8 frequencies of a 16-wide head in the smoothed band, one
# below it and the rest above; (c) Llama 3.2: tied embeddings, factor 32; (d) SmolLM2: 9 query
# heads on 3 KV heads, tied, theta 1e5.
CONFIGS_UNDER_TEST = {
    "llama2": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "llama3.1": dict(hidden_size=128, intermediate_size=160, num_attention_heads=8, num_key_value_heads=2,
                     rope_parameters=LLAMA3_ROPE),
    "llama3.2": dict(hidden_size=128, intermediate_size=160, num_attention_heads=8, num_key_value_heads=2,
                     tie_word_embeddings=True, rope_parameters={**LLAMA3_ROPE, "factor": 32.0}),
    "smollm2": dict(hidden_size=144, intermediate_size=96, num_attention_heads=9, num_key_value_heads=3,
                    tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e5}),
}


def hf_llama(**fields):
    """A random LlamaForCausalLM. Weights are drawn wider than transformers' init (std 0.02) so that
    attention is far from uniform and logits spread over several units: a wrong rotary layout or
    a swapped tensor then moves logits by far more than the tolerances below."""
    cfg = transformers.LlamaConfig(vocab_size=96, num_hidden_layers=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-5, **fields)
    torch.manual_seed(0)
    return spread_init(transformers.LlamaForCausalLM(cfg)).eval()


@pytest.fixture(params=list(CONFIGS_UNDER_TEST))
def saved(request, tmp_path):
    """(transformers model, directory it was saved to)."""
    model = hf_llama(**CONFIGS_UNDER_TEST[request.param])
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def tokens(n=24, seed=1):
    return torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_match_transformers(saved):
    hf_model, path = saved
    ckpt = load_checkpoint(path)
    assert ckpt.format == "hf"
    model = build_model(ckpt).eval()
    x = tokens()
    ours, theirs = model(x), hf_model(x).logits
    assert theirs.std() > 0.5  # logits far from flat, so the comparison can fail
    assert (ours - theirs).abs().max() <= 1e-4
    assert model.output.weight is model.tok_embeddings.weight or not ckpt.config.tie_embeddings


@torch.no_grad()
def test_greedy_decoding_with_kv_cache_matches_generate(saved):
    hf_model, path = saved
    model = build_model(load_checkpoint(path)).eval()
    prompt = tokens(5, seed=2)
    expected = hf_model.generate(prompt, do_sample=False, max_new_tokens=32, min_new_tokens=32,
                                 attention_mask=torch.ones_like(prompt))[0, 5:].tolist()
    cache = model.new_cache(1, 64)
    logits = model(prompt, torch.arange(5), cache)
    got = []
    for pos in range(5, 5 + 32):
        got.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[got[-1]]]), torch.tensor([pos]), cache)
    assert got == expected


def test_config_read_from_both_transformers_layouts(tmp_path):
    """config.json of transformers 5.x (rope_parameters) and 4.x (rope_theta + rope_scaling)."""
    v5 = {"architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 160,
          "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 96,
          "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_parameters": LLAMA3_ROPE}
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    v4 = {**{k: v for k, v in v5.items() if k != "rope_parameters"}, "rope_theta": 5e5, "rope_scaling": scaling}
    a, b = config_from_hf(tmp_path, v5), config_from_hf(tmp_path, v4)
    assert a == b
    assert a.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64) and a.rope_theta == 5e5 and a.n_kv_heads == 2


@torch.no_grad()
def test_rotary_layout_and_scaling_matter(tmp_path):
    """The parity tests above can fail: q/k left in HF's layout, or rope scaling dropped, move
    the logits by far more than their 1e-4 tolerance."""
    hf_model = hf_llama(**CONFIGS_UNDER_TEST["llama3.1"])
    hf_model.save_pretrained(tmp_path)
    ckpt = load_checkpoint(tmp_path)
    x = tokens()
    good = build_model(ckpt)(x)
    unscaled = Checkpoint(ckpt.config.replace(rope_scaling=None), ckpt.state_dict, "hf", tmp_path)
    assert (build_model(unscaled)(x) - good).abs().max() > 1e-2
    raw = dict(ckpt.state_dict)
    for i, layer in enumerate(hf_model.model.layers):  # HF's rotate-half rows, not un-permuted
        raw[f"layers.{i}.attention.wq.weight"] = layer.self_attn.q_proj.weight
        raw[f"layers.{i}.attention.wk.weight"] = layer.self_attn.k_proj.weight
    assert (build_model(Checkpoint(ckpt.config, raw, "hf", tmp_path))(x) - good).abs().max() > 1e-2


@torch.no_grad()
def test_sharded_checkpoint_loads(tmp_path):
    hf_model = hf_llama(**CONFIGS_UNDER_TEST["llama3.1"])
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    assert (tmp_path / "model.safetensors.index.json").exists()
    x = tokens()
    assert (build_model(load_checkpoint(tmp_path))(x) - hf_model(x).logits).abs().max() <= 1e-4


@torch.no_grad()
def test_save_hf_sharded_is_loaded_by_transformers(saved, tmp_path):
    hf_model, path = saved
    ckpt = load_checkpoint(path)
    out = save_hf(ckpt.config, ckpt.state_dict, tmp_path / "out", eos_ids={2, 3}, max_shard_bytes=30_000)
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.eos_token_id == [2, 3]
    x = tokens()
    assert torch.equal(reloaded(x).logits, hf_model(x).logits)


def test_round_trip_hf_meta_hf_is_bit_identical(saved, tmp_path):
    from safetensors.torch import load_file

    _, path = saved
    first = load_checkpoint(path)
    save_meta(first.config, first.state_dict, tmp_path / "meta")
    meta = load_checkpoint(tmp_path / "meta")
    assert meta.format == "meta"
    save_hf(meta.config, meta.state_dict, tmp_path / "hf2")
    second = load_checkpoint(tmp_path / "hf2")
    for ckpt in (meta, second):
        assert ckpt.config.replace(name="") == first.config.replace(name="")
        assert ckpt.state_dict.keys() == first.state_dict.keys()
        for name, t in first.state_dict.items():
            assert ckpt.state_dict[name].dtype == t.dtype and torch.equal(ckpt.state_dict[name], t), name
    # and the files written are transformers' own tensors, in HF's layout
    original = {k: v for f in path.glob("*.safetensors") for k, v in load_file(f).items()}
    written = load_file(tmp_path / "hf2" / "model.safetensors")
    assert written.keys() == original.keys()
    assert all(torch.equal(written[k], original[k]) for k in original)


def split_meta(state_dict, n, embedding_dim):
    """Meta's model-parallel layout: column-parallel weights (wq, wk, wv, w1, w3, output) split
    along output rows, row-parallel ones (wo, w2) along input columns, the embedding along
    `embedding_dim` (0: Llama 3's VocabParallelEmbedding, 1: Llama 2's ParallelEmbedding), norms
    copied to every rank."""
    shards = [{} for _ in range(n)]
    for name, t in state_dict.items():
        if name == "tok_embeddings.weight":
            d = embedding_dim
        elif name.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")) or name == "output.weight":
            d = 0
        elif name.endswith(("wo.weight", "w2.weight")):
            d = 1
        else:
            d = None
        for shard, part in zip(shards, [t] * n if d is None else t.chunk(n, dim=d)):
            shard[name] = part.clone()
    return shards


@pytest.mark.parametrize("embedding_dim", [0, 1])
def test_meta_two_model_parallel_shards_equal_one(tmp_path, embedding_dim):
    hf_model = hf_llama(**CONFIGS_UNDER_TEST["llama3.1"])
    hf_model.save_pretrained(tmp_path / "hf")
    ckpt = load_checkpoint(tmp_path / "hf")
    one = save_meta(ckpt.config, ckpt.state_dict, tmp_path / "one")
    params = json.loads((one / "params.json").read_text())
    params["vocab_size"] = -1  # as Llama 1/2 ship it: read off the embedding
    two = tmp_path / "two"
    two.mkdir()
    (two / "params.json").write_text(json.dumps(params))
    full = torch.load(one / "consolidated.00.pth", weights_only=True)
    for i, shard in enumerate(split_meta(full, 2, embedding_dim)):
        torch.save(shard, two / f"consolidated.{i:02d}.pth")
    a, b = load_checkpoint(one), load_checkpoint(two)
    assert b.config.replace(name="") == a.config.replace(name="")
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


@pytest.mark.parametrize("dim, multiple_of, multiplier, hidden", [
    (4096, 256, None, 11008),    # Llama 2 7B
    (8192, 4096, 1.3, 28672),    # Llama 2 70B
    (4096, 1024, 1.3, 14336),    # Llama 3 8B
    (2048, 256, 1.5, 8192),      # Llama 3.2 1B
    (16384, 4096, 1.2, 53248),   # Llama 3.1 405B
])
def test_meta_ffn_width_from_params(dim, multiple_of, multiplier, hidden):
    """params.json of Meta's releases give the FFN widths of their HF configs."""
    assert meta_hidden_dim(dim, multiple_of, multiplier) == hidden


def test_meta_ffn_params_reproduce_every_registered_width():
    for cfg in CONFIGS.values():
        assert meta_hidden_dim(cfg.dim, *meta_ffn_params(cfg.dim, cfg.hidden_dim)) == cfg.hidden_dim, cfg.name


@pytest.mark.parametrize("name, params", [
    ("llama-2-7b", {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
                    "vocab_size": -1}),
    ("llama-3.1-8b", {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
                      "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
                      "vocab_size": 128256}),
    ("llama-3.2-1b", {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                      "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,
                      "use_scaled_rope": True}),
])
def test_meta_params_of_releases_give_their_configs(tmp_path, name, params):
    """params.json as Meta ships it: no context length, and for Llama 3.2 no rope factor (32, where
    Llama 3.1 has 8); both come from the registered release with the same shapes."""
    from herd.checkpoint.meta import config_from_params

    known = CONFIGS[name]
    embedding = torch.zeros(1).expand(known.vocab_size, known.dim)  # shapes without the memory
    state_dict = {"tok_embeddings.weight": embedding}
    if not known.tie_embeddings:
        state_dict["output.weight"] = torch.ones(1).expand(known.vocab_size, known.dim)
    assert config_from_params(tmp_path, params, state_dict).replace(name=name) == known
