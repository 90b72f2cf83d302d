"""Bad input gives a one-line HerdError that names the file and what is wrong."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from herd.checkpoint import convert, detect_format, load_checkpoint, save_hf, save_meta
from herd.config import ModelConfig
from herd.errors import HerdError
from herd.model.transformer import Transformer

CFG = ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=64, hidden_dim=48)


def random_state_dict():
    torch.manual_seed(0)
    return Transformer(CFG).state_dict()


def fails(path, *words, **kwargs) -> str:
    """Load `path`, expect a one-line HerdError naming `path` and containing `words`."""
    with pytest.raises(HerdError) as err:
        load_checkpoint(path, tokenizer=False, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word in message, message
    return message


@pytest.fixture
def hf_dir(tmp_path):
    return save_hf(CFG, random_state_dict(), tmp_path / "hf")


@pytest.fixture
def meta_dir(tmp_path):
    return save_meta(CFG, random_state_dict(), tmp_path / "meta")


def truncate(src, dst, keep: float):
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


# --- files that are cut short or corrupt -------------------------------------------------------

def test_truncated_safetensors(hf_dir):
    f = hf_dir / "model.safetensors"
    truncate(f, f, 0.5)
    assert str(f) in fails(hf_dir, "truncated")


def test_corrupt_safetensors_header(hf_dir):
    f = hf_dir / "model.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    assert str(f) in fails(hf_dir, "corrupt")


def test_index_naming_a_missing_shard(hf_dir):
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    fails(hf_dir, "model-00001-of-00002.safetensors", "missing")


@pytest.mark.parametrize("keep", [0.002, 0.5, 0.999])
def test_truncated_gguf(shared, tmp_path, keep):
    path = truncate(shared("models", "stories260K", "stories260K.gguf"), tmp_path / "cut.gguf", keep)
    fails(path, "GGUF")


def test_truncated_llama2c_bin(shared, tmp_path):
    path = truncate(shared("models", "stories260K", "stories260K.bin"), tmp_path / "cut.bin", 0.7)
    fails(path, "truncated")


def test_llama2c_versioned_export_is_named(tmp_path):
    path = tmp_path / "v1.bin"
    path.write_bytes(bytes.fromhex("3234 6b61") + bytes(300))  # magic 0x616b3432, little-endian
    fails(path, "version")


def test_truncated_pth(meta_dir):
    f = meta_dir / "consolidated.00.pth"
    truncate(f, f, 0.5)
    assert str(f) in fails(meta_dir, "corrupt or truncated")


class _Payload:
    """Pickles to a call that would create a file if anything unpickled it with code execution."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pth_with_code_in_its_pickle_is_refused(meta_dir, tmp_path):
    marker = tmp_path / "pwned"
    f = meta_dir / "consolidated.00.pth"
    sd = torch.load(f, weights_only=True)
    torch.save({**sd, "evil": _Payload(marker)}, f)
    message = fails(meta_dir, "refused", "could run code")
    assert str(f) in message and "mkdir" in message
    assert not marker.exists()


# --- shapes and fields that do not agree -----------------------------------------------------

def test_hf_shapes_disagree_with_config(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    config["intermediate_size"] = 64
    (hf_dir / "config.json").write_text(json.dumps(config))
    fails(hf_dir, "feed_forward.w1.weight", "[48, 32]", "[64, 32]")


def test_hf_unknown_architecture(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (hf_dir / "config.json").write_text(json.dumps(config))
    fails(hf_dir, "unsupported architecture", "MistralForCausalLM")


@pytest.mark.parametrize("change, words", [
    ({"num_hidden_layers": None}, ["lacks", "num_hidden_layers"]),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["rope type", "yarn"]),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ["llama3", "low_freq_factor"]),
    ({"head_dim": 16}, ["head_dim 16"]),
    ({"attention_bias": True}, ["attention_bias"]),
    ({"num_attention_heads": 5}, ["not divisible"]),
    ({"rms_norm_eps": "tiny"}, ["rms_norm_eps"]),
])
def test_hf_bad_config_fields(hf_dir, change, words):
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(change)
    config = {k: v for k, v in config.items() if v is not None}
    (hf_dir / "config.json").write_text(json.dumps(config))
    fails(hf_dir, *words)


@pytest.mark.parametrize("text", ["{'single': 'quotes'}", "[1, 2]"])
def test_hf_config_not_a_json_object(hf_dir, text):
    (hf_dir / "config.json").write_text(text)
    fails(hf_dir, "config.json", "JSON")


def test_meta_params_not_a_json_object(meta_dir):
    (meta_dir / "params.json").write_text("null")
    fails(meta_dir, "params.json", "JSON object")


@pytest.mark.parametrize("change, words", [
    ({"dim": None}, ["params.json", "lacks dim"]),
    ({"n_layers": "1"}, ["params.json", "n_layers", "'1'"]),
    ({"norm_eps": "small"}, ["params.json", "norm_eps"]),
    ({"n_heads": 0}, ["params.json", "n_heads must be a positive integer"]),
    ({"n_kv_heads": 2}, ["attention.wk.weight", "[32, 32]", "[16, 32]"]),
    ({"multiple_of": 7}, ["feed_forward.w1.weight"]),
])
def test_meta_bad_params(meta_dir, change, words):
    params = json.loads((meta_dir / "params.json").read_text())
    params.update(change)
    params = {k: v for k, v in params.items() if v is not None}
    (meta_dir / "params.json").write_text(json.dumps(params))
    fails(meta_dir, *words)


def test_meta_shards_not_numbered_from_zero(meta_dir):
    (meta_dir / "consolidated.00.pth").rename(meta_dir / "consolidated.01.pth")
    fails(meta_dir, "consolidated.01.pth")


def test_meta_shards_that_do_not_fit_together(meta_dir):
    shutil.copy(meta_dir / "consolidated.00.pth", meta_dir / "consolidated.01.pth")
    sd = torch.load(meta_dir / "consolidated.01.pth", weights_only=True)
    del sd["norm.weight"]
    torch.save(sd, meta_dir / "consolidated.01.pth")
    fails(meta_dir, "consolidated.01.pth", "other tensors")


# --- things that are not checkpoints -----------------------------------------------------------

def test_missing_path(tmp_path):
    fails(tmp_path / "nowhere", "no such file")


def test_directory_without_a_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    fails(tmp_path, "not a checkpoint directory")


@pytest.mark.parametrize("name, data", [("model.bin", b"PK\x03\x04" + bytes(100)), ("notes.txt", b"hello"),
                                        ("weights.bin", b"\x01\x00")])
def test_unknown_file_format(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(HerdError, match="unknown checkpoint format"):
        detect_format(path)
    fails(path, "unknown checkpoint format")


def test_bad_dtype(hf_dir):
    with pytest.raises(HerdError, match="dtype"):
        load_checkpoint(hf_dir, dtype=torch.int8)


def test_convert_refuses_unknown_target_and_nonempty_destination(hf_dir, tmp_path):
    with pytest.raises(HerdError, match="'onnx'"):
        convert(hf_dir, tmp_path / "out", to="onnx")
    with pytest.raises(HerdError, match="not an empty directory"):
        convert(hf_dir, hf_dir, to="meta")
