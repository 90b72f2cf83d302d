"""Packed weights and their kernels: quantizers bit-exact with gguf-py, kernels equal to an exact
emulation of their arithmetic, GGUF blocks repacked to exactly gguf-py's dequantized values, and the
native decode step equal to the torch forward."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from safetensors.torch import load_file, save_file
from conftest import require_shared
from helpers import spread_init

from herd.config import ModelConfig
from herd.errors import HerdError
from herd.model import Transformer
from herd.quant import PackedLinear, native, pack_weight, quantize
from herd.quant.forward import enable
from herd.quant.gguf import repack
from herd.quant.linear import MV_MAX_TOKENS, unpack_q4

needs_kernels = pytest.mark.skipif(native.library() is None, reason="no C compiler to build herd's kernels")


@pytest.mark.parametrize("qtype, fmt, symmetric", [(T.Q8_0, "q8", False), (T.Q4_0, "q4", True), (T.Q4_1, "q4", False)])
def test_quantizers_match_gguf_py(qtype, fmt, symmetric):
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.05
    w[0, :32] = 0  # an all-zero block
    w[1, 5], w[2, 7] = 3.0, -3.0  # outliers of both signs
    packed = pack_weight(w, fmt, 32, symmetric)
    expected = gguf_dequantize(gguf_quantize(w.numpy(), qtype), qtype)
    assert np.array_equal(packed.dequantize().numpy(), expected)


def _f16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).astype(np.float32)


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """a * b + c rounded once to float32 (through float64: the product is exact there)."""
    return (a.astype(np.float64) * b + c).astype(np.float32)


def ggml_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [M, K] float32 quantized as llama.cpp's quantize_row_q8_0 / q8_1 do on x86 (arch/x86/quants.c):
    q = round half to even(x * (127 / max|x|)), d = fp16(max|x| / 127), s = fp16(max|x| / 127 * sum q)."""
    xb = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(xb).max(-1)
    inv = np.where(amax != 0, np.float32(127) / np.where(amax != 0, amax, 1), 0).astype(np.float32)
    q = np.rint(xb * inv[..., None]).astype(np.int64)
    d = amax / np.float32(127)
    return q, _f16(d), _f16(d * q.sum(-1).astype(np.float32))


def _emulate(layer: PackedLinear, x: torch.Tensor) -> torch.Tensor:
    """What the int8/int4 kernels compute, float32 operation by float32 operation, as llama.cpp's
    ggml_vec_dot_q8_0_q8_0 / q4_0_q8_0 / q4_1_q8_1 do on x86: per block of 32, 8 integer lanes of 4
    products each, each lane accumulating (scale_w * scale_x) * lane with one rounding per block, the
    lanes summed as hsum_float_8 does, plus (Q4_1) the offsets m * s summed block after block."""
    q, d, s = ggml_activations(x.numpy())
    M, nb = d.shape
    t = {k: v.numpy() for k, v in layer.packed().items()}
    g = layer.group_size
    w = t["qweight"].astype(np.int64) if layer.fmt == "q8" else unpack_q4(layer.qweight).numpy().astype(np.int64)
    if layer.fmt == "q4" and "mins" not in t:
        w = w - 8
    N = w.shape[0]
    lanes = np.einsum("nbjt,mbjt->mnbj", w.reshape(N, nb, 8, 4), q.reshape(M, nb, 8, 4)).astype(np.float32)
    sw = t["scales"].astype(np.float32)
    lane_group = (np.arange(nb)[:, None] * 32 + np.arange(8)[None] * 4) // g  # [nb, 8]: each lane's group
    mult = sw[:, lane_group][None] * d[:, None, :, None]  # [M, N, nb, 8]
    acc = np.zeros((M, N, 8), np.float32)
    for b in range(nb):
        acc = _fma(mult[:, :, b], lanes[:, :, b], acc)
    a = [acc[..., j] for j in range(8)]
    y = ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
    if "mins" in t:
        xg = np.zeros((M, nb * 32 // g), np.float32)
        for b in range(nb):
            xg[:, b * 32 // g] += s[:, b]
        off = np.zeros((M, N), np.float32)
        for gi in range(xg.shape[1]):
            off = _fma(t["mins"][:, gi].astype(np.float32)[None], xg[:, gi:gi + 1], off)
        y = y + off
    return torch.from_numpy(y)


LAYERS = [("f16", None, False), ("bf16", None, False), ("q8", None, False), ("q8", 32, False), ("q8", 64, False),
          ("q4", 32, False), ("q4", 32, True), ("q4", 64, False), ("q4", 128, False)]


@needs_kernels
@pytest.mark.parametrize("fmt, group, symmetric", LAYERS)
@pytest.mark.parametrize("tokens", [1, 3, 6, 29])
def test_decode_kernels(fmt, group, symmetric, tokens):
    torch.manual_seed(1)
    layer = pack_weight(torch.randn(70, 256) * 0.05, fmt, group, symmetric)  # odd rows: a lone last row
    x = torch.randn(tokens, 256)
    y = layer(x)
    if fmt in ("f16", "bf16"):
        torch.testing.assert_close(y, x @ layer.dequantize().T, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(y, _emulate(layer, x))
        ref = x @ layer.dequantize().T
        assert (y - ref).norm() / ref.norm() < 0.01  # int8 activations cost well under 1%


@needs_kernels
@pytest.mark.parametrize("fmt, group, symmetric", [("f32", None, False)] + LAYERS)
def test_prefill_kernels(fmt, group, symmetric):
    """Many tokens: fp32 and 16-bit weights go through the blocked fp32 product; int8 and int4 ones
    through the same arithmetic as a decode step (llama.cpp's), whatever the number of tokens."""
    torch.manual_seed(2)
    # 1000 rows: a part panel of 8 rows; 1152 inputs: two slices of 512 and one of 128; 23 or 39
    # tokens: groups of 6 and a part group
    layer = pack_weight(torch.randn(1000, 1152) * 0.05, fmt, group, symmetric)
    x = torch.randn(MV_MAX_TOKENS.get(fmt, 32) + 7, 1152)
    if fmt in ("q8", "q4"):
        assert torch.equal(layer(x), _emulate(layer, x))
    else:
        torch.testing.assert_close(layer(x), x @ layer.dequantize().T, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(native._compiler() is None, reason="no C compiler")
def test_portable_kernels(monkeypatch):
    """Built for plain C (HERD_ISA=generic: no vector instructions of its own), the kernels compute
    the same: the integer ones bit for bit."""
    monkeypatch.setattr(native, "library", lambda lib=native.library("generic"): lib)
    torch.manual_seed(4)
    for fmt, group, symmetric in [("f32", None, False)] + LAYERS:
        layer = pack_weight(torch.randn(40, 1152) * 0.05, fmt, group, symmetric)
        few, many = torch.randn(3, 1152), torch.randn(MV_MAX_TOKENS.get(fmt, 32) + 7, 1152)
        if fmt in ("q8", "q4"):
            assert torch.equal(layer(few), _emulate(layer, few))
        else:
            torch.testing.assert_close(layer(few), few @ layer.dequantize().T, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(layer(many), many @ layer.dequantize().T, rtol=1e-4, atol=1e-4)


def test_fp32_scales_and_group_16():
    """GGUF Q6_K repacks to int8 with fp32 scales per 16 inputs; Q4_K to int4 with fp32 scales."""
    torch.manual_seed(3)
    q8 = PackedLinear("q8", 64, 8, 16, {"qweight": torch.randint(-32, 32, (8, 64), dtype=torch.int8),
                                        "scales": torch.rand(8, 4)})
    q4 = PackedLinear("q4", 64, 8, 32, {"qweight": torch.randint(0, 256, (8, 32), dtype=torch.uint8),
                                        "scales": torch.rand(8, 2), "mins": -torch.rand(8, 2)})
    x = torch.randn(2, 64)
    for layer in (q8, q4):
        if native.library() is not None:
            assert torch.equal(layer(x), _emulate(layer, x))
            many = torch.randn(40, 64)  # prefill
            assert torch.equal(layer(many), _emulate(layer, many))


def test_torch_fallback(monkeypatch):
    """Without the kernels (no compiler), packed layers still compute the dequantized product."""
    monkeypatch.setattr(native, "library", lambda: None)
    layer = pack_weight(torch.randn(16, 64), "q4", 32)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ layer.dequantize().T)


def _random_blocks(qtype: T, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Valid random GGUF blocks: random quant bytes, small finite fp16 scales."""
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    scale = lambda count: rng.uniform(0.001, 0.05, (n, k // block, count)).astype(np.float16).view(np.uint8)  # noqa: E731
    if qtype in (T.Q8_0, T.Q4_0):
        raw[..., :2] = scale(1)
    elif qtype in (T.Q4_1, T.Q4_K):
        raw[..., :4] = scale(2)
    elif qtype == T.Q6_K:
        raw[..., 208:] = scale(1)
    return raw.reshape(n, -1)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q6_K, T.F16, T.BF16])
def test_gguf_repack_is_exact(qtype):
    rng = np.random.default_rng(0)
    n, k = 6, 512
    if qtype in (T.F16, T.BF16):
        values = rng.standard_normal((n, k)).astype(np.float32)
        data = gguf_quantize(values, qtype).reshape(n, -1).view(np.uint8)
    else:
        data = _random_blocks(qtype, n, k, rng)
    fmt, group, tensors = repack(qtype, (n, k), data)
    layer = PackedLinear(fmt, k, n, group, tensors)
    expected = gguf_dequantize(data, qtype).reshape(n, k)
    assert np.array_equal(layer.dequantize().numpy(), expected)


def _model(tie: bool) -> Transformer:
    torch.manual_seed(4)
    cfg = ModelConfig(dim=128, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=256,
                      max_seq_len=128, tie_embeddings=tie)
    return spread_init(Transformer(cfg)).eval()


def _close(a: torch.Tensor, b: torch.Tensor, bits: int) -> None:
    if bits >= 16:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    else:  # the kernels round activations to int8: a 1e-7 difference upstream can flip a rounding
        assert (a - b).norm() / b.norm() < 0.01


@needs_kernels
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("bits", [32, 16, 8, 4])
@torch.inference_mode()
def test_native_forward_equals_torch_forward(tie, bits):
    """Rows at different positions, several tokens per row, logits at chosen positions."""
    model = _model(tie)
    if bits != 32:
        quantize(model, bits)
    fast = enable(copy.deepcopy(model))
    prompt = torch.randint(0, 512, (2, 20))
    slow_cache, fast_cache = model.new_cache(2, 64), fast.new_cache(2, 64)
    model(prompt, None, slow_cache)
    fast(prompt, None, fast_cache)  # 40 tokens: the torch forward runs for both
    tokens, pos = torch.randint(0, 512, (2, 3)), torch.tensor([[20, 21, 22], [14, 15, 16]])
    _close(fast(tokens, pos, fast_cache), model(tokens, pos, slow_cache), bits)
    _close(fast_cache.k, slow_cache.k, bits)
    at = torch.tensor([0, 2])
    _close(fast(tokens, pos, fast_cache, logits_at=at), model(tokens, pos, slow_cache, logits_at=at), bits)


@needs_kernels
@torch.inference_mode()
def test_native_forward_is_batch_invariant():
    """A token's logits are bit-identical whether it runs alone or with other tokens (what makes
    speculative decoding exactly greedy)."""
    model = enable(quantize(_model(True), 4))
    cache = model.new_cache(1, 64)
    model(torch.randint(0, 512, (1, 30)), None, cache)
    tokens = torch.randint(0, 512, (1, 5))
    together = model(tokens, torch.arange(30, 35), cache)
    alone = torch.cat([model(tokens[:, i:i + 1], torch.tensor([30 + i]), cache) for i in range(5)], 1)
    assert torch.equal(together, alone)


def test_native_forward_steps_aside():
    """With autograd on, or too many tokens, the torch forward runs (and gives its own errors)."""
    model = enable(_model(True))
    cache = model.new_cache(1, 8)
    with pytest.raises(ValueError, match="beyond the KV cache"):
        with torch.no_grad():
            model(torch.zeros(1, 1, dtype=torch.long), torch.tensor([8]), cache)
    logits = model(torch.zeros(1, 2, dtype=torch.long), None, cache)
    assert logits.requires_grad


def _huge_kb(address: int) -> int:
    """AnonHugePages of this process's mapping that holds `address`."""
    smaps = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(smaps):
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):
            lo, hi = (int(a, 16) for a in first.split("-"))
            if lo <= address < hi:
                return next(int(x.split()[1]) for x in smaps[i + 1:] if x.startswith("AnonHugePages:"))
    raise AssertionError(f"no mapping holds {address:#x}")


@torch.inference_mode()
def test_enable_moves_weights_into_huge_pages(tmp_path):
    """enable() copies the weights into one block of 2 MB pages: every value is unchanged, tied
    weights stay one tensor, each tensor keeps a storage of its own (safetensors saves them), and
    where the kernel gives huge pages on request (Linux THP) the weights are in them."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=512, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=4096, hidden_dim=1024,
                      max_seq_len=64, tie_embeddings=True)
    model = spread_init(Transformer(cfg)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    enable(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.output.weight is model.tok_embeddings.weight
    save_file({k: v for k, v in after.items() if k != "output.weight"}, tmp_path / "w.safetensors")
    assert torch.equal(load_file(tmp_path / "w.safetensors")["layers.1.feed_forward.w2.weight"],
                       before["layers.1.feed_forward.w2.weight"])
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off on this machine")
    assert _huge_kb(model.layers[0].feed_forward.w1.weight.data_ptr()) >= 8 * 1024  # the whole block: ~13 MB


def test_quantize_errors():
    with pytest.raises(HerdError, match="bits must be"):
        quantize(_model(True), 3)
    with pytest.raises(HerdError, match="group size"):
        quantize(_model(True), 4, group_size=48)


@pytest.mark.parametrize("source", ["stories260K.bin", "stories260K.gguf"])
def test_quantize_command_writes_a_checkpoint_that_loads_packed(source, tmp_path, capsys):
    """`herd quantize` on a llama2.c file (tokenizer file beside it) and on a GGUF (vocabulary
    inside): the saved checkpoint loads packed, with its tokenizer, and generates exactly what the
    same model quantized in memory generates; a second write to the same place is a one-line error."""
    import herd
    from herd.cli import main

    src = require_shared("models", "stories260K", source)
    dst = tmp_path / "q8"
    assert main(["quantize", str(src), str(dst), "--bits", "8"]) == 0
    saved = herd.load(str(dst))
    assert any(isinstance(m, PackedLinear) for m in saved.model.modules())
    fresh = herd.load(str(src), quantize="int8")
    options = {"max_tokens": 24, "temperature": 0}
    assert saved.generate("Once upon a time", **options) == fresh.generate("Once upon a time", **options)
    capsys.readouterr()
    assert main(["quantize", str(src), str(dst), "--bits", "8"]) == 2
    assert "already exists" in capsys.readouterr().err
