"""GGUF files written by herd: read back, they are the same model (f32 exactly, f16 within its
rounding, quants identical to herd's own quantization), with the vocabulary and rope scaling; the
fast header reader agrees with gguf-py's; llama.cpp loads them when llama-bench is on PATH."""

import shutil
import subprocess

import pytest
import torch
from conftest import require_shared
from helpers import spread_init, tiny_config

from herd.checkpoint import build_model, convert, load_checkpoint, read_gguf_metadata, save_hf
from herd.checkpoint.gguf_file import GGUFFile
from herd.checkpoint.gguf_packed import load_gguf_packed
from herd.errors import HerdError
from herd.model import Transformer
from herd.quant import quantize

TOKENS = torch.tensor([[1, 45, 300, 7, 99, 402, 12, 3, 17, 250, 64, 88, 5, 311, 2, 42, 9, 130, 77, 6]])


@pytest.fixture(scope="module")
def stories():
    path = require_shared("models", "stories260K", "stories260K.bin")
    return path, build_model(load_checkpoint(path)).eval()


@torch.inference_mode()
@pytest.mark.parametrize("kind, bits, symmetric", [("q8_0", 8, False), ("q4_0", 4, True), ("q4_1", 4, False)])
def test_quantized_round_trip_is_herds_own_model(tmp_path, stories, kind, bits, symmetric):
    path, model = stories
    out = convert(path, tmp_path / "s.gguf", "gguf", gguf_type=kind)
    loaded, ckpt = load_gguf_packed(out)
    ours = quantize(build_model(load_checkpoint(path)).eval(), bits, 32, symmetric)
    assert torch.equal(loaded(TOKENS), ours(TOKENS))
    assert ckpt.tokenizer.encode("Once upon a time", bos=True) == load_checkpoint(path).tokenizer.encode(
        "Once upon a time", bos=True)


@torch.inference_mode()
def test_float_round_trips(tmp_path, stories):
    path, model = stories
    expected = model(TOKENS)
    f32, _ = load_gguf_packed(convert(path, tmp_path / "f32.gguf", "gguf", gguf_type="f32"))
    assert torch.equal(f32(TOKENS), expected)
    f16, _ = load_gguf_packed(convert(path, tmp_path / "f16.gguf", "gguf", gguf_type="f16"))
    assert (f16(TOKENS) - expected).abs().max() <= 1e-3 * expected.abs().max()


@torch.inference_mode()
def test_rope_scaling_and_untied_output(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config("llama3", tie_embeddings=False, vocab_size=512)
    model = spread_init(Transformer(cfg)).eval()
    save_hf(cfg, model.state_dict(), tmp_path / "hf")
    loaded, ckpt = load_gguf_packed(convert(tmp_path / "hf", tmp_path / "m.gguf", "gguf", gguf_type="f32"))
    assert ckpt.config.rope_scaling == cfg.rope_scaling and not ckpt.config.tie_embeddings
    assert torch.equal(loaded(TOKENS), model(TOKENS))


def test_header_reader_matches_gguf_py(shared, smollm2_gguf):
    for path in (shared("models", "stories260K", "stories260K.gguf"), smollm2_gguf):
        assert GGUFFile(path).metadata == read_gguf_metadata(path)


def test_bad_files(tmp_path, shared):
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(shared("models", "stories260K", "stories260K.gguf").read_bytes()[:5000])
    with pytest.raises(HerdError, match="corrupt or truncated"):
        GGUFFile(truncated)
    with pytest.raises(HerdError, match="unknown GGUF type"):
        convert(shared("models", "stories260K", "stories260K.bin"), tmp_path / "x.gguf", "gguf", gguf_type="q3_k")


@pytest.mark.skipif(shutil.which("llama-bench") is None, reason="llama-bench (llama.cpp) is not on PATH")
@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_0"])
def test_llama_cpp_loads_it(tmp_path, stories, kind):
    out = convert(stories[0], tmp_path / "s.gguf", "gguf", gguf_type=kind)
    result = subprocess.run(["llama-bench", "-m", str(out), "-p", "8", "-n", "8", "-r", "1", "-t", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
