"""Real checkpoints from shared/ (stories260K as llama2.c .bin and as GGUF, SmolLM2 Q4_1 GGUF),
GGUF quantization types against transformers' GGUF loader, conversion, and the tokenizer hand-off."""

from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest
import torch
from helpers import spread_init, tiny_config

from herd.checkpoint import (
    base,
    build_model,
    convert,
    detect_format,
    gguf_file,
    llama2c,
    load_checkpoint,
    read_gguf_metadata,
)
from herd.config import ModelConfig, RopeScaling, get_config
from herd.errors import HerdError
from herd.model.transformer import Transformer

Q = gguf.GGMLQuantizationType


@pytest.fixture
def stories(shared):
    return shared("models", "stories260K", "stories260K.bin"), shared("models", "stories260K", "stories260K.gguf")


@pytest.fixture
def expected_greedy(shared):
    return json.loads(shared("models", "stories260K", "expected_greedy.json").read_text())


@torch.no_grad()
def greedy_from_bos(model, steps):
    """llama2.c's run: BOS (id 1) at position 0, then feed back the argmax token."""
    cache = model.new_cache(1, steps)
    token, out = 1, []
    for pos in range(steps):
        token = int(model(torch.tensor([[token]]), torch.tensor([pos]), cache)[0, -1].argmax())
        out.append(token)
    return out


def test_stories260k_bin_and_gguf_hold_the_same_weights(stories):
    bin_path, gguf_path = stories
    assert detect_format(bin_path) == "llama2c" and detect_format(gguf_path) == "gguf"
    a, b = load_checkpoint(bin_path, tokenizer=False), load_checkpoint(gguf_path, tokenizer=False)
    assert a.config == get_config("stories260k").replace(name="stories260K")
    # The GGUF says nothing of the 512-token training context, and stores the shared classifier
    # as a copy, which is recognised as tied.
    assert b.config.replace(name="", max_seq_len=512) == a.config.replace(name="")
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    x = torch.tensor([[1, 403, 407, 261, 378]])
    with torch.no_grad():
        assert torch.equal(build_model(a)(x), build_model(b)(x))


@pytest.mark.parametrize("which", ["bin", "gguf"])
def test_stories260k_greedy_matches_llama2c(stories, expected_greedy, which):
    path = stories[0] if which == "bin" else stories[1]
    model = build_model(load_checkpoint(path, tokenizer=False)).eval()
    got = greedy_from_bos(model, 256)
    assert got[:200] == expected_greedy["greedy_200_steps"]["generated_token_ids"]
    assert got == expected_greedy["greedy_256_steps"]["generated_token_ids"]


def test_dtype_cast_on_load(stories):
    ckpt = load_checkpoint(stories[0], dtype=torch.bfloat16, tokenizer=False)
    assert {t.dtype for t in ckpt.state_dict.values()} == {torch.bfloat16}
    assert build_model(ckpt)(torch.tensor([[1, 2]])).dtype == torch.bfloat16


def test_gguf_metadata_is_plain_python(stories):
    md = read_gguf_metadata(stories[1])
    assert md["general.architecture"] == "llama"
    assert md["llama.block_count"] == 5 and isinstance(md["llama.block_count"], int)
    assert isinstance(md["llama.attention.layer_norm_rms_epsilon"], float)
    assert len(md["tokenizer.ggml.tokens"]) == 512 and all(isinstance(t, str) for t in md["tokenizer.ggml.tokens"])
    assert md["tokenizer.ggml.tokens"][1] == "<s>" and isinstance(md["tokenizer.ggml.scores"][0], float)
    assert not any(k.startswith("GGUF.") for k in md)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_checkpoint(smollm2_gguf, tokenizer=False)


def test_smollm2_q4_1_gguf_loads(smollm2):
    assert smollm2.format == "gguf"
    assert smollm2.config.replace(name="smollm2-135m") == get_config("smollm2-135m")
    assert "output.weight" not in smollm2.state_dict  # tied, as the file has no output tensor
    assert {t.dtype for t in smollm2.state_dict.values()} == {torch.float32}
    assert smollm2.eos_ids == {2}
    assert "<|im_start|>" in smollm2.chat_template


@torch.no_grad()
def test_smollm2_logits_match_transformers_gguf_loading(smollm2, smollm2_gguf):
    """Both sides dequantize the same blocks, so the weights come out bit-identical (checked);
    what is left is float32 summation order through 30 layers, measured at ~5e-5 on logits of
    magnitude ~30. A tolerance of 1e-3 leaves a 20x margin yet is far below what one wrong
    tensor or rotary layout causes (whole units)."""
    from herd.checkpoint.hf import hf_names, hf_to_interleaved

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                           dtype=torch.float32).eval()
    cfg, names = smollm2.config, hf_names(smollm2.config.n_layers)
    for hf_name, t in hf.state_dict().items():
        if names[hf_name] == "output.weight":
            continue
        heads = {"q_proj": cfg.n_heads, "k_proj": cfg.n_kv_heads}.get(hf_name.split(".")[-2])
        t = t if heads is None else hf_to_interleaved(t, heads)
        assert torch.equal(t, smollm2.state_dict[names[hf_name]]), hf_name
    x = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 2]])  # arbitrary ids, BOS-led
    ours, theirs = build_model(smollm2).eval()(x), hf(x).logits
    assert theirs.abs().max() > 10
    assert (ours - theirs).abs().max() <= 1e-3


# --- GGUF files written here, read by herd and by transformers -------------------------------

_LAYER_TENSORS = {
    "attention_norm": gguf.MODEL_TENSOR.ATTN_NORM, "attention.wq": gguf.MODEL_TENSOR.ATTN_Q,
    "attention.wk": gguf.MODEL_TENSOR.ATTN_K, "attention.wv": gguf.MODEL_TENSOR.ATTN_V,
    "attention.wo": gguf.MODEL_TENSOR.ATTN_OUT, "ffn_norm": gguf.MODEL_TENSOR.FFN_NORM,
    "feed_forward.w1": gguf.MODEL_TENSOR.FFN_GATE, "feed_forward.w2": gguf.MODEL_TENSOR.FFN_DOWN,
    "feed_forward.w3": gguf.MODEL_TENSOR.FFN_UP,
}
_TOP_TENSORS = {"tok_embeddings": gguf.MODEL_TENSOR.TOKEN_EMBD, "norm": gguf.MODEL_TENSOR.OUTPUT_NORM,
                "output": gguf.MODEL_TENSOR.OUTPUT}


def llama_cpp_name(name: str) -> str:
    base, kind = name.rsplit(".", 1)  # kind: weight (or bias)
    if base.startswith("layers."):
        _, i, rest = base.split(".", 2)
        return f"{gguf.TENSOR_NAMES[_LAYER_TENSORS[rest]].format(bid=int(i))}.{kind}"
    return f"{gguf.TENSOR_NAMES[_TOP_TENSORS[base]]}.{kind}"


def random_state_dict(cfg: ModelConfig, seed=0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    sd = spread_init(Transformer(cfg)).state_dict()
    if cfg.tie_embeddings:
        del sd["output.weight"]
    return sd


def random_k_blocks(rows: int, cols: int, qtype, rng) -> np.ndarray:
    """Valid K-quant blocks (gguf can dequantize but not quantize these): random bits with fp16
    scales that keep weights within about +-0.1, like the other tensors."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(1e-4 if qtype == Q.Q4_K else 2e-5).tobytes(), np.uint8)
    for start in ((0, 2) if qtype == Q.Q4_K else (208,)):  # Q4_K: d, dmin first; Q6_K: d last
        blocks[..., start:start + 2] = scale
    return blocks.reshape(rows, -1)


def write_gguf(path, cfg: ModelConfig, sd: dict[str, torch.Tensor], qtypes=(Q.F32,), arch="llama",
               rope_freqs: np.ndarray | None = None):
    """A llama.cpp-style GGUF of `sd` (herd names, interleaved q/k), 2-D tensors cycling through
    `qtypes`, 1-D ones in F32 as llama.cpp keeps them."""
    w = gguf.GGUFWriter(path, arch)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    rng = np.random.default_rng(0)
    matrices = 0
    for name, t in sd.items():
        a = t.float().numpy()
        if a.ndim == 1:
            w.add_tensor(llama_cpp_name(name), a)
            continue
        qtype = qtypes[matrices % len(qtypes)]
        matrices += 1
        if qtype == Q.F32:
            w.add_tensor(llama_cpp_name(name), a)
        elif qtype == Q.F16:
            w.add_tensor(llama_cpp_name(name), a.astype(np.float16))
        elif qtype in (Q.Q4_K, Q.Q6_K):
            w.add_tensor(llama_cpp_name(name), random_k_blocks(*a.shape, qtype, rng), raw_dtype=qtype)
        else:
            w.add_tensor(llama_cpp_name(name), gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@torch.no_grad()
def test_gguf_quant_types_match_transformers(tmp_path):
    """Every supported tensor type in one file (K-quants need rows of 256), read by herd and by
    transformers' GGUF loader: same dequantized weights through different name mapping and q/k
    handling, so the logits agree to float32 rounding."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    cfg = ModelConfig(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=96, hidden_dim=256, max_seq_len=64)
    qtypes = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K)
    path = write_gguf(tmp_path / "tiny.gguf", cfg, random_state_dict(cfg), qtypes)
    ckpt = load_checkpoint(path)
    assert ckpt.config.replace(name="") == cfg
    kinds = {t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert set(qtypes) <= kinds
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    x = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(0))
    ours, theirs = build_model(ckpt)(x), hf.eval()(x).logits
    assert theirs.std() > 0.1
    assert (ours - theirs).abs().max() <= 1e-4


def test_gguf_quantized_weights_are_close_to_the_originals(tmp_path):
    cfg = tiny_config("llama2", n_layers=1, vocab_size=96, tie_embeddings=True)
    sd = random_state_dict(cfg)
    # error bounds: half a step of each format for weights of this size (|w| < ~0.7)
    for qtype, atol in [(Q.F32, 0), (Q.F16, 1e-3), (Q.BF16, 5e-3), (Q.Q8_0, 5e-3), (Q.Q4_0, 0.1), (Q.Q4_1, 0.1)]:
        path = write_gguf(tmp_path / f"{qtype.name}.gguf", cfg, sd, (qtype,))
        got = load_checkpoint(path, dtype=torch.float32).state_dict
        assert got.keys() == sd.keys()
        assert all((got[k] - sd[k]).abs().max() <= atol for k in sd), qtype.name


def llama_cpp_rope_factors(head_dim, theta, factor, low=1.0, high=4.0, original=8192):
    """The rope_freqs tensor llama.cpp's converter writes for Llama 3.1 scaling: per frequency,
    the divisor applied to it."""
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_gguf_rope_freqs_become_llama3_scaling(tmp_path, factor):
    cfg = ModelConfig(dim=256, n_layers=1, n_heads=4, vocab_size=96, hidden_dim=64, rope_theta=5e5)
    factors = llama_cpp_rope_factors(cfg.head_dim, cfg.rope_theta, factor)
    assert 1.0 < factors[len(factors) // 2] < factor  # the file exercises the smoothed band
    path = write_gguf(tmp_path / "l31.gguf", cfg, random_state_dict(cfg), rope_freqs=factors)
    assert load_checkpoint(path).config.rope_scaling == RopeScaling(factor, 1.0, 4.0, 8192)


def test_gguf_bad_files_are_named(tmp_path):
    cfg = tiny_config("llama2", n_layers=1, vocab_size=96, tie_embeddings=True)
    sd = random_state_dict(cfg)
    cases = [
        (write_gguf(tmp_path / "qwen.gguf", cfg, sd, arch="qwen2"), "unsupported architecture 'qwen2'"),
        (write_gguf(tmp_path / "ffn.gguf", cfg.replace(hidden_dim=80), sd),
         f"feed_forward.w1.weight has shape [{cfg.hidden_dim}, {cfg.dim}]"),
        (write_gguf(tmp_path / "rope.gguf", cfg, sd, rope_freqs=np.linspace(1, 3, 8, dtype=np.float32)), "rope_freqs"),
        (write_gguf(tmp_path / "extra.gguf", cfg, {**sd, "layers.0.attention.wq.bias": sd["norm.weight"]}),
         "unexpected tensor blk.0.attn_q.bias"),
    ]
    for path, words in cases:
        with pytest.raises(HerdError) as err:
            load_checkpoint(path)
        assert str(path) in str(err.value) and words in str(err.value), str(err.value)


# --- conversion -------------------------------------------------------------------------------

@torch.no_grad()
def test_convert_llama2c_to_hf_is_read_by_transformers(stories, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = convert(stories[0], tmp_path / "hf", to="hf")
    assert (out / "tokenizer.model").read_bytes() == (stories[0].parent / "tok512.model").read_bytes()
    src, dst = load_checkpoint(stories[0], tokenizer=False), load_checkpoint(out, tokenizer=False)
    assert dst.config.replace(name="") == src.config.replace(name="")
    assert all(torch.equal(src.state_dict[k], dst.state_dict[k]) for k in src.state_dict)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.tensor([[1, 403, 407, 261, 378, 432, 383, 286]])
    assert (hf(x).logits - build_model(src)(x)).abs().max() <= 1e-4


def test_convert_hf_to_meta_carries_tokenizer_files(stories, tmp_path):
    hf_dir = convert(stories[1], tmp_path / "hf", to="hf")
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    meta_dir = convert(hf_dir, tmp_path / "meta", to="meta")
    for name in ("tokenizer_config.json", "generation_config.json"):
        assert (meta_dir / name).read_bytes() == (hf_dir / name).read_bytes()
    ckpt = load_checkpoint(meta_dir, tokenizer=False)
    assert ckpt.format == "meta" and ckpt.chat_template == "{{ messages }}" and ckpt.eos_ids == {2, 7}
    assert ckpt.config.tie_embeddings


# --- the tokenizer hand-off (to the tokenizer package, stood in for here) ---------------------

@pytest.fixture
def fake_tokenizer_package(monkeypatch):
    calls = []
    for reader in (base, llama2c):
        monkeypatch.setattr(reader, "load_tokenizer", lambda path: calls.append(("file", path)) or "file-tokenizer")
    monkeypatch.setattr(gguf_file, "tokenizer_from_gguf", lambda fields: calls.append(("gguf", fields)) or "gguf-tokenizer")
    return calls


def test_llama2c_tokenizer_is_the_model_file_beside_it(stories, fake_tokenizer_package):
    assert load_checkpoint(stories[0]).tokenizer == "file-tokenizer"
    assert fake_tokenizer_package == [("file", stories[0].parent / "tok512.model")]


def test_gguf_tokenizer_is_built_from_its_metadata(stories, fake_tokenizer_package):
    assert load_checkpoint(stories[1]).tokenizer == "gguf-tokenizer"
    [(kind, fields)] = fake_tokenizer_package
    assert kind == "gguf" and fields["tokenizer.ggml.model"] == "llama" and len(fields["tokenizer.ggml.tokens"]) == 512


def test_directory_tokenizer_is_loaded_from_the_directory(stories, tmp_path, fake_tokenizer_package):
    out = convert(stories[0], tmp_path / "hf", to="hf")
    assert load_checkpoint(out).tokenizer == "file-tokenizer"
    assert fake_tokenizer_package == [("file", out)]
    assert load_checkpoint(out, tokenizer=False).tokenizer is None


@pytest.mark.parametrize("which", ["bin", "gguf"])
def test_stories260k_real_tokenizer_decodes_the_published_text(stories, expected_greedy, which):
    try:
        from herd.tokenizer import load_tokenizer, tokenizer_from_gguf  # noqa: F401
    except ImportError:
        pytest.skip("the tokenizer package (herd.tokenizer) is not merged yet")
    ckpt = load_checkpoint(stories[0] if which == "bin" else stories[1])
    expected = expected_greedy["greedy_200_steps"]
    assert ckpt.tokenizer.decode(expected["generated_token_ids"]) == expected["expected_text"]
