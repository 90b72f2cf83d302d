"""`herd bench`: the bytes a decode step streams, and the command end to end on a tiny config."""

import subprocess
import sys

import pytest

from herd.bench import bench, random_model, streamed_bytes
from herd.config import get_config
from herd.errors import HerdError


def test_streamed_bytes():
    cfg = get_config("stories15m")  # tied: the embedding is the output matrix, counted once
    assert streamed_bytes(random_model("stories15m", "f32")) == 4 * cfg.num_params()
    int8 = random_model("stories15m", "int8")  # int8 + an fp16 scale per 32 weights; norms fp32
    norms = cfg.dim * (2 * cfg.n_layers + 1)
    assert streamed_bytes(int8) == (cfg.num_params() - norms) * (1 + 2 / 32) + 4 * norms


def test_bench_command():
    r = subprocess.run([sys.executable, "-m", "herd", "bench", "stories260k", "--formats", "f32,int4", "--prompt", "8",
                        "--tokens", "4", "--no-transformers", "--no-llama-cpp"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("memory bandwidth") and len(lines) == 4
    for line, fmt in zip(lines[2:], ("f32", "int4")):
        engine, form, prefill, decode, mb, frac, rss = line.split()
        assert (engine, form) == ("herd", fmt)
        assert float(prefill) > 0 and float(decode) > 0 and float(frac) >= 0 and float(rss) > 50


def test_bench_errors():
    with pytest.raises(HerdError, match="unknown format"):
        bench("stories260k", ["int3"])
    with pytest.raises(HerdError, match="stories9"):
        bench("stories9", ["f32"])
