"""Tensor parallelism on gloo: 2 and 4 CPU ranks give the logits of one process (within 1e-5 in
fp32) and the same 32 greedy tokens, on Llama 2/3/4 shapes read from HF, Meta and GGUF files; a
Meta checkpoint with one shard per rank is read shard by shard (counted by the kernel's own
read_bytes); splits that cut a head fail before anything is read."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import spread_init, tiny_config
from test_llama4 import SCOUT_LIKE, greedy_cached, hf_model

from herd import parallel
from herd.checkpoint import save_hf
from herd.checkpoint.gguf_writer import save_gguf
from herd.checkpoint.load import load_model
from herd.errors import HerdError
from herd.model import Transformer

# GQA with KV heads divisible by 4 ranks; a vocabulary of 203 leaves the last rank short rows
CONFIGS = {
    "llama2": tiny_config("llama2"),
    "llama3": tiny_config("llama3", n_heads=8, n_kv_heads=4, vocab_size=203),
}
LLAMA4 = {**SCOUT_LIKE, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 8}
# Meta's model-parallel split: q/k/v, w1/w3 and output by rows, wo/w2 by columns, the embedding
# by vocabulary rows (Llama 3), norms whole on every rank
META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1, "output": 0, "tok_embeddings": 0}


def random_model(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    sd = spread_init(Transformer(cfg)).state_dict()
    return {k: v for k, v in sd.items() if not (cfg.tie_embeddings and k == "output.weight")}


def save_meta_shards(cfg, sd: dict[str, torch.Tensor], out, n: int) -> None:
    """Meta's layout: params.json and consolidated.NN.pth, each holding its rank's slices."""
    import json

    from herd.checkpoint.meta import meta_ffn_params

    out.mkdir(parents=True, exist_ok=True)
    multiple_of, multiplier = meta_ffn_params(cfg.dim, cfg.hidden_dim)
    (out / "params.json").write_text(json.dumps({
        "dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size, "multiple_of": multiple_of, "ffn_dim_multiplier": multiplier,
        "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "max_seq_len": cfg.max_seq_len}))
    for k in range(n):
        shard = {}
        for name, t in sd.items():
            d = META_SPLIT.get(name.split(".")[-2])
            shard[name] = t.clone() if d is None else t.chunk(n, dim=d)[k].clone()
        torch.save(shard, out / f"consolidated.{k:02d}.pth")


def reference(path):
    model, _ = load_model(path, torch.float32, quantize_to="dequant")  # the ranks run GGUF quants dequantized
    model.fast_forward = None  # the plain torch path, as the ranks run it
    return model


def check_same(path, ref, tp, prompts=([3, 17, 99, 5, 42, 7, 150, 11, 64, 2, 120, 33, 8], [1, 180, 2, 90])):
    tokens = torch.randint(0, ref.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, got = ref(tokens), tp(tokens)
    assert expected.std() > 0.5  # spread logits: a wrong slice would move them far past the tolerance
    assert (got - expected).abs().max() <= 1e-5
    want = greedy_cached(ref, list(prompts), 32)
    assert greedy_cached(tp, list(prompts), 32) == want
    assert len({t for w in want for t in w}) > 3  # not one repeated token


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    for family, cfg in CONFIGS.items():
        save_hf(cfg, random_model(cfg), root / family)
    meta = CONFIGS["llama3"].replace(tie_embeddings=False, vocab_size=200)  # Meta splits evenly
    save_meta_shards(meta, random_model(meta, seed=1), root / "meta", 2)
    save_gguf(CONFIGS["llama2"], random_model(CONFIGS["llama2"], seed=2), root / "q8.gguf", "q8_0")
    hf_model(LLAMA4, root / "llama4")
    return root


@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)])  # 4 ranks on 2 cores: slow
def world(request):
    parallel.start(request.param)
    yield request.param
    parallel.stop()


@pytest.mark.parametrize("name", ["llama2", "llama3", "meta", "q8.gguf"])
def test_ranks_give_the_logits_and_greedy_tokens_of_one_process(files, world, name):
    path = files / name
    tp, ckpt = parallel.load(path, world, torch.float32)
    assert ckpt.format == {"meta": "meta", "q8.gguf": "gguf"}.get(name, "hf")
    check_same(path, reference(path), tp)


@pytest.mark.parametrize("experts", parallel.EXPERT_SPLITS)
def test_llama4_experts_split_either_way(files, world, experts):
    path = files / "llama4"
    tp, _ = parallel.load(path, world, torch.float32, experts=experts)
    check_same(path, reference(path), tp, prompts=([5, 17, 200, 3, 99, 42, 7, 256, 11, 64, 128, 1, 300], [9, 310]))


def _evict(path) -> int:
    """Drop the file's pages from the page cache, so that reading it again counts as read_bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return path.stat().st_size


def test_meta_shard_k_is_read_by_rank_k_alone(tmp_path, world):
    if not os.path.exists("/proc/self/io"):
        pytest.skip("no /proc/self/io to count the bytes read")
    cfg = tiny_config("llama3", dim=256, n_heads=8, n_kv_heads=4, hidden_dim=768, tie_embeddings=False,
                      vocab_size=4096)
    save_meta_shards(cfg, random_model(cfg), tmp_path, world)
    sizes = [_evict(tmp_path / f"consolidated.{k:02d}.pth") for k in range(world)]
    tp, _ = parallel.load(tmp_path, world, torch.float32)
    for k, report in enumerate(tp.load_report):  # its own shard, and of the others nothing past their index
        assert 0.9 * sizes[k] <= report["read_bytes"] <= sizes[k] * 1.05, (tp.load_report, sizes)


@pytest.mark.parametrize("tp, why", [(3, "does not divide the model's 8 attention heads"),
                                     (8, "more than the model's 4 KV heads")])
def test_a_split_that_cuts_heads_fails_before_loading(files, tp, why):
    with pytest.raises(HerdError, match=why):
        parallel.load(files / "llama3", tp, torch.float32)




PEAK_RSS = """
import json, sys, torch
from herd import parallel
from herd.checkpoint.load import load_model
from herd.parallel.loading import peak_rss

def main(path, world):
    tokens = torch.arange(64).unsqueeze(0)
    if world == 1:
        model, _ = load_model(path, torch.float32)
    else:
        model, _ = parallel.load(path, world, torch.float32)
    with torch.inference_mode():
        model(tokens, cache=model.new_cache(1, 128))
    print(json.dumps([peak_rss()] if world == 1 else model.mirror.peak_rss()))

if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
"""


@pytest.mark.slow
def test_peak_rss_per_rank_is_at_most_0_6_of_one_process(tmp_path):
    import json
    import subprocess
    import sys

    from herd.config import ModelConfig

    cfg = ModelConfig(dim=1024, n_layers=12, n_heads=16, n_kv_heads=8, vocab_size=32000, hidden_dim=2816,
                      max_seq_len=256)
    assert cfg.num_params() >= 200_000_000
    save_hf(cfg, random_model(cfg), tmp_path / "model")
    script = tmp_path / "peak.py"
    script.write_text(PEAK_RSS)

    def peaks(world: int) -> list[int]:  # a fresh process each: the same imports, nothing else held
        out = subprocess.run([sys.executable, str(script), str(tmp_path / "model"), str(world)], capture_output=True,
                             text=True, timeout=600, check=True).stdout
        return json.loads(out.splitlines()[-1])

    (one,), ranks = peaks(1), peaks(2)
    assert len(ranks) == 2 and max(ranks) <= 0.6 * one, (ranks, one)
