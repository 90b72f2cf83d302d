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

# its own shape, not a tiny_config: the expected messages below quote these widths ([48, 32], [16, 32])
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


# --- what a file says is checked before it is believed ------------------------------------------

@pytest.mark.parametrize("change, words", [
    ({"norm_eps": 0.0}, ["norm_eps", "0.0"]),
    ({"norm_eps": float("nan")}, ["norm_eps"]),
    ({"rope_theta": -1.0}, ["rope_theta"]),
    ({"rope_theta": float("inf")}, ["rope_theta"]),
    ({"dim": -32}, ["dim", "-32"]),
    ({"dim": 2**40}, ["dim", str(2**40)]),
    ({"n_layers": 10**6}, ["n_layers", "1000000"]),
    ({"n_layers": True}, ["n_layers"]),
    ({"vocab_size": 0}, ["vocab_size"]),
    ({"hidden_dim": 2.5}, ["hidden_dim"]),
    ({"max_seq_len": 2**62}, ["max_seq_len"]),
    ({"rope_scaling": {"factor": 0.0}}, ["rope_scaling"]),
    ({"rope_scaling": {"bogus": 1}}, ["bogus"]),
])
def test_nonsense_config_values_are_refused_with_the_field_named(change, words):
    with pytest.raises(HerdError) as err:
        CFG.replace(**change)
    for word in words:
        assert word in str(err.value)


def test_every_registered_config_reads_back_from_hf_and_meta_fields(tmp_path):
    """The bounds refuse no released model: each registered shape, written as a config.json and
    as params.json fields, reads back."""
    from herd.checkpoint.hf import config_from_hf, hf_config_json
    from herd.checkpoint.meta import config_from_params, meta_ffn_params
    from herd.config import CONFIGS

    for name, cfg in CONFIGS.items():
        if cfg.moe is None:
            hf = config_from_hf(tmp_path, hf_config_json(cfg, torch.bfloat16, set()))
            assert (hf.dim, hf.n_layers, hf.hidden_dim, hf.vocab_size) == (cfg.dim, cfg.n_layers, cfg.hidden_dim,
                                                                          cfg.vocab_size), name
        multiple_of, multiplier = meta_ffn_params(cfg.dim, cfg.hidden_dim)
        params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
                  "vocab_size": cfg.vocab_size, "multiple_of": multiple_of, "ffn_dim_multiplier": multiplier,
                  "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "max_seq_len": cfg.max_seq_len}
        assert config_from_params(tmp_path, params, {}).hidden_dim == cfg.hidden_dim, name


def test_llama4_scout_config_as_released_is_accepted(tmp_path):
    from herd.checkpoint.hf_llama4 import config_from_hf_llama4

    text = {"attention_bias": False, "attention_chunk_size": 8192, "attn_scale": 0.1, "attn_temperature_tuning": 4,
            "floor_scale": 8192, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
            "interleave_moe_layer_step": 1, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
            "max_position_embeddings": 10485760, "model_type": "llama4_text", "no_rope_layers": [1, 1, 1, 0] * 12,
            "num_attention_heads": 40, "num_experts_per_tok": 1, "num_hidden_layers": 48, "num_key_value_heads": 8,
            "num_local_experts": 16, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "use_qk_norm": True,
            "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "vocab_size": 202048}
    cfg, prefix = config_from_hf_llama4(tmp_path, {"model_type": "llama4", "text_config": text})
    assert prefix == "language_model." and cfg.num_params() == pytest.approx(107.8e9, rel=1e-2)


def _tiny_gguf(tmp_path):
    from test_bad_files import gguf

    return gguf()(tmp_path)


def test_every_prefix_of_a_gguf_file_is_refused_in_one_line(tmp_path):
    """A file cut anywhere (header, metadata, tensor infos, data) is a HerdError, never another
    exception or an allocation the file cannot back; both GGUF loaders."""
    from herd.checkpoint.gguf_packed import load_gguf_packed

    data = _tiny_gguf(tmp_path).read_bytes()
    cut = tmp_path / "cut.gguf"
    for n in [*range(4, 1200), *range(1200, len(data), 61)]:  # the header byte by byte, the data sampled
        cut.write_bytes(data[:n])
        for load in (load_checkpoint, load_gguf_packed):
            with pytest.raises(HerdError, match="GGUF"):
                load(cut)


@pytest.mark.parametrize("kind", ["gguf", "safetensors", "llama2c"])
def test_random_corruptions_load_or_fail_in_one_line(tmp_path, kind):
    """Bytes of a file's header overwritten at random: the loaders either load the result or raise
    a one-line HerdError."""
    import random

    from test_bad_files import hf_dir, llama2c

    from herd.checkpoint.gguf_packed import load_gguf_packed

    floats = 8 * 16 + 8 + 2 * 8 + 4 * 64 + 3 * 8 * 16 + 8 + 64 * 2
    path = {"gguf": _tiny_gguf, "safetensors": hf_dir(), "llama2c": llama2c(8, 16, 1, 2, 2, 16, 64, floats=floats)
            }[kind](tmp_path)
    file = path / "model.safetensors" if path.is_dir() else path
    original = file.read_bytes()
    header = {"gguf": 1200, "safetensors": 800, "llama2c": 28}[kind]
    rng = random.Random(0)
    for _ in range(150):
        data = bytearray(original)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(header)
            data[at: at + 8] = rng.choice([bytes([rng.randrange(256)]), rng.randbytes(8), b"\xff" * 8, bytes(8)])
        file.write_bytes(bytes(data[:len(original)]))
        for load in (load_checkpoint, load_gguf_packed) if kind == "gguf" else (load_checkpoint,):
            try:
                load(path)
            except HerdError as e:
                assert "\n" not in str(e)


def test_tensors_are_checked_against_the_config_before_any_is_read(tmp_path, monkeypatch):
    """Names and shapes come from the headers and a model on the meta device: a lying file is
    refused before a single tensor is read."""
    from safetensors import safe_open
    from test_bad_files import _hf_shapes, _llama_kvs, _u32, gguf, hf_dir, safetensors_bytes

    from herd.checkpoint import gguf_file

    def never(*args, **kwargs):
        raise AssertionError("a tensor was read")

    with safe_open(hf_dir()(tmp_path / "probe") / "model.safetensors", framework="pt") as f:
        monkeypatch.setattr(type(f), "get_tensor", never)
    monkeypatch.setattr(gguf_file, "to_float", never, raising=False)
    shapes = {**_hf_shapes(), "model.layers.0.mlp.up_proj.weight": [15, 8]}
    fails(hf_dir(weights=safetensors_bytes(shapes))(tmp_path / "a"), "feed_forward.w3.weight", "[15, 8]")
    path = gguf(kvs=_llama_kvs(ffn=_u32("llama.feed_forward_length", 24)))(tmp_path / "b")
    fails(path, "feed_forward.w1.weight", "[24, 8]")


def test_packed_checkpoint_tensors_are_checked_against_their_format(tmp_path):
    """herd's C kernels read packed weights by pointer: a packed layer whose tensors are smaller than
    its format needs is refused, not handed to them."""
    from test_bad_files import herd_packed_lie

    from herd.checkpoint import load_model

    path = herd_packed_lie(tmp_path)
    with pytest.raises(HerdError, match="layers.0.attention.wq .*qweight"):
        load_model(path, torch.float32)


def test_every_torch_load_is_weights_only():
    """Pickles never run code: every torch.load in herd passes weights_only=True, and nothing
    else unpickles."""
    import ast
    from pathlib import Path

    import herd

    for file in Path(herd.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                called = ast.unparse(node.func)
                assert called not in ("pickle.load", "pickle.loads", "pickle.Unpickler"), f"{file}: {called}"
                if called == "torch.load":
                    flag = {k.arg: k.value for k in node.keywords}.get("weights_only")
                    assert isinstance(flag, ast.Constant) and flag.value is True, \
                        f"{file}:{node.lineno}: torch.load without weights_only=True"
