"""The kernels per instruction set (herd/quant/native.py builds one library per ISA): each ISA this
CPU runs gives the generic (plain C) path's results, bit for bit for the integer kernels, within fp32
rounding for the float ones; HERD_ISA forces one and refuses what the CPU lacks; HERD_DEBUG says
which was chosen. An ISA the CPU lacks is skipped, with the reason."""

import ctypes
import os
import subprocess
import sys

import pytest
import torch

from herd.errors import HerdError
from herd.quant import native, pack_weight

needs_compiler = pytest.mark.skipif(native._compiler() is None, reason="no C compiler to build herd's kernels")

# (rows, inputs): the model shapes' input widths (SmolLM2-135M 576 / 1536, stories110M 768 / 2048,
# TinyLlama-1.1B 2048 / 5632), with odd row counts (a lone last row, a thread's uneven share)
SHAPES = [(71, 576), (33, 1536), (45, 768), (9, 5632)]
# (format, group, symmetric): GGUF's Q8_0, Q4_0, Q4_1 and Q6_K (group 16), herd's per-row int8 and int4 with
# groups of 64
INTEGER = [("q8", 32, False), ("q4", 32, True), ("q4", 32, False), ("q8", 16, False), ("q8", None, False),
           ("q4", 64, False), ("q4", 64, True)]
FLOAT = ["f32", "f16", "bf16"]
TOKENS = [1, 3, 4, 5, 29, 70]  # a lone token, part and whole tiles of 4, prefill


def run(lib: ctypes.CDLL, layer, x: torch.Tensor) -> torch.Tensor:
    """y = x W^T through `lib`'s kernels: herd_linear, or herd_matmul beyond a few float tokens."""
    y = torch.empty(x.shape[0], layer.out_features)
    fn = lib.herd_matmul if layer.fmt in FLOAT and x.shape[0] > 16 else lib.herd_linear
    fn(ctypes.byref(layer.describe()), x.data_ptr(), x.shape[0], y.data_ptr(), 2)
    return y


def _layer(fmt: str, group: int | None, symmetric: bool, n: int, k: int):
    if fmt == "q8" and group == 16:  # Q6_K's shape: int8 in groups of 16 with fp32 scales
        from herd.quant import PackedLinear

        return PackedLinear("q8", k, n, 16, {"qweight": torch.randint(-32, 32, (n, k), dtype=torch.int8),
                                             "scales": torch.rand(n, k // 16) * 0.01})
    return pack_weight(torch.randn(n, k) * 0.05, fmt, group, symmetric)


@needs_compiler
@pytest.mark.parametrize("isa", [i for i in native.ISAS if i != "generic"])
def test_every_isa_gives_the_generic_results(isa):
    if isa not in native.cpu_isas():
        pytest.skip(f"this CPU lacks {isa} (it runs {', '.join(native.cpu_isas())})")
    generic, lib = native.library("generic"), native.library(isa)
    torch.manual_seed(5)
    for n, k in SHAPES:
        x = torch.randn(max(TOKENS), k)
        x[0, :32] = 0  # a block of zeros
        x[1, 40] = 30.0  # an outlier
        for fmt, group, symmetric in INTEGER:
            layer = _layer(fmt, group, symmetric, n, k)
            for m in TOKENS:
                assert torch.equal(run(lib, layer, x[:m]), run(generic, layer, x[:m])), (isa, fmt, group, n, k, m)
        for fmt in FLOAT:
            layer = pack_weight(torch.randn(n, k) * 0.05, fmt)
            for m in TOKENS:
                torch.testing.assert_close(run(lib, layer, x[:m]), run(generic, layer, x[:m]), rtol=1e-5, atol=1e-5)


def test_herd_isa_refuses_what_the_cpu_lacks(monkeypatch):
    monkeypatch.setattr(native, "cpu_isas", lambda: ("generic", "avx2"))
    for forced, why in [("avx512", "this CPU lacks it"), ("amx", "herd has no AMX kernels"),
                        ("sse9", r"unknown instruction set \(herd's: generic, avx2, avx512\)")]:
        monkeypatch.setenv("HERD_ISA", forced)
        with pytest.raises(HerdError, match=rf"^HERD_ISA={forced}: {why}; this CPU runs generic, avx2$"):
            native.chosen_isa()
    monkeypatch.setenv("HERD_ISA", "generic")
    assert native.chosen_isa() == "generic"
    monkeypatch.delenv("HERD_ISA")
    assert native.chosen_isa() == "avx2"  # the best the CPU runs


@needs_compiler
def test_herd_debug_logs_the_choice():
    env = dict(os.environ, HERD_DEBUG="1", HERD_ISA="generic")
    code = "from herd.quant import native; assert native.library() is native.library('generic')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "herd: kernels for generic" in result.stderr
    assert f"this CPU runs {', '.join(native.cpu_isas())} (HERD_ISA)" in result.stderr


def test_the_cli_refuses_an_isa_in_one_line(shared):
    model = shared("models", "stories260K", "stories260K.gguf")
    env = dict(os.environ, HERD_ISA="amx")
    result = subprocess.run([sys.executable, "-m", "herd", "generate", "-m", str(model), "--quantize", "int8",
                             "-n", "3", "Once"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"herd generate: error: HERD_ISA=amx: herd has no AMX kernels; this CPU runs {', '.join(native.cpu_isas())}"]
