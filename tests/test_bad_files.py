"""A corpus of hostile checkpoint files, generated at test time: each must be refused by the real
command line (`herd generate -m FILE`) with exit code 2 and one line on stderr, within 20 s and a
4 GiB address space, naming what is wrong. Loading is bounded by the file, and files never run code.

The default run loads every file through `herd.cli.main` in one subprocess (one torch import)
under those limits, and a few as separate `python -m herd` processes; `-m slow` runs every file
as its own process.

Run as a script (`python tests/test_bad_files.py CASES.json`), this module is that subprocess.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import resource
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

LIMIT_BYTES = 4 << 30
LIMIT_SECONDS = 20


# --- GGUF, assembled by hand so that every count and offset can lie ---------------------------

U32, I32, F32, STR, ARR, U64 = 4, 5, 6, 8, 9, 10
F32_TENSOR = 0
DIM, HIDDEN, VOCAB, HEADS = 8, 16, 16, 2


def _str(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, kind: int, payload: bytes) -> bytes:
    return _str(key) + struct.pack("<I", kind) + payload


def _u32(key: str, value: int) -> bytes:
    return _kv(key, U32, struct.pack("<I", value))


def _f32(key: str, value: float) -> bytes:
    return _kv(key, F32, struct.pack("<f", value))


def _llama_kvs(**override: bytes) -> list[bytes]:
    """Metadata of a tiny Llama (one layer); `override` replaces entries by key suffix."""
    kvs = {"arch": _kv("general.architecture", STR, _str("llama")),
           "dim": _u32("llama.embedding_length", DIM), "layers": _u32("llama.block_count", 1),
           "heads": _u32("llama.attention.head_count", HEADS), "ffn": _u32("llama.feed_forward_length", HIDDEN),
           "ctx": _u32("llama.context_length", 64)}
    kvs.update(override)
    return [v for v in kvs.values() if v]


def _llama_tensors() -> list[tuple[str, list[int]]]:
    """(name, GGML dims: fastest first) of the tiny Llama's tensors; the embedding is tied."""
    tensors = [("token_embd.weight", [DIM, VOCAB]), ("output_norm.weight", [DIM])]
    for suffix, dims in [("attn_norm", [DIM]), ("attn_q", [DIM, DIM]), ("attn_k", [DIM, DIM]),
                         ("attn_v", [DIM, DIM]), ("attn_output", [DIM, DIM]), ("ffn_norm", [DIM]),
                         ("ffn_gate", [DIM, HIDDEN]), ("ffn_down", [HIDDEN, DIM]), ("ffn_up", [DIM, HIDDEN])]:
        tensors.append((f"blk.0.{suffix}.weight", dims))
    return tensors


def _info(name: str, dims: list[int], kind: int, offset: int) -> bytes:
    return _str(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, kind, offset)


def gguf_parts(kvs: list[bytes] | None = None, tensors: list[tuple[str, list[int]]] | None = None, *,
               version: int = 3, n_kv: int | None = None, n_tensors: int | None = None,
               infos: list[bytes] | None = None) -> list[bytes]:
    """[header, *metadata, *tensor infos, padding, data] of a GGUF file of float32 tensors."""
    kvs = _llama_kvs() if kvs is None else kvs
    tensors = _llama_tensors() if tensors is None else tensors
    data, offsets = b"", []
    for _, dims in tensors:
        offsets.append(len(data))
        data += struct.pack(f"<{math.prod(dims)}f", *[0.01 * (i % 7) for i in range(math.prod(dims))])
        data += bytes(-len(data) % 32)
    if infos is None:
        infos = [_info(name, dims, F32_TENSOR, off) for (name, dims), off in zip(tensors, offsets)]
    header = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                   len(kvs) if n_kv is None else n_kv)
    head = len(header) + sum(map(len, kvs)) + sum(map(len, infos))
    return [header, *kvs, *infos, bytes(-head % 32), data]


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def gguf(**kwargs) -> Callable[[Path], Path]:
    return lambda d: write(d / "model.gguf", b"".join(gguf_parts(**kwargs)))


def gguf_bytes(data: bytes) -> Callable[[Path], Path]:
    return lambda d: write(d / "model.gguf", data)


def gguf_cut(section: int, extra: int) -> Callable[[Path], Path]:
    """The tiny GGUF cut `extra` bytes into its part number `section`."""
    parts = gguf_parts()
    return gguf_bytes(b"".join(parts[:section]) + parts[section][:extra])


def _tensor_lie(name: str, dims: list[int], kind: int = F32_TENSOR, offset: int = 0,
                n_dims: int | None = None, name_length: int | None = None) -> Callable[[Path], Path]:
    """The tiny GGUF whose first tensor info is replaced by a lying one."""
    length = len(name) if name_length is None else name_length
    info = struct.pack("<Q", length) + name.encode() + struct.pack("<I", len(dims) if n_dims is None else n_dims) + \
        struct.pack(f"<{len(dims)}QIQ", *dims, kind, offset)
    infos = gguf_parts()[1 + len(_llama_kvs()): -2]
    return gguf(infos=[info, *infos[1:]])


def _array(key: str, item_kind: int, n: int, items: bytes = b"") -> bytes:
    return _kv(key, ARR, struct.pack("<IQ", item_kind, n) + items)


# --- safetensors, Hugging Face and Meta directories -----------------------------------------------

HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": DIM,
             "intermediate_size": HIDDEN, "num_hidden_layers": 1, "num_attention_heads": HEADS,
             "num_key_value_heads": HEADS, "vocab_size": VOCAB, "max_position_embeddings": 64,
             "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True, "hidden_act": "silu"}


def _hf_shapes(n_layers: int = 1) -> dict[str, list[int]]:
    shapes = {"model.embed_tokens.weight": [VOCAB, DIM], "model.norm.weight": [DIM]}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": [DIM], p + "post_attention_layernorm.weight": [DIM],
                       p + "self_attn.q_proj.weight": [DIM, DIM], p + "self_attn.k_proj.weight": [DIM, DIM],
                       p + "self_attn.v_proj.weight": [DIM, DIM], p + "self_attn.o_proj.weight": [DIM, DIM],
                       p + "mlp.gate_proj.weight": [HIDDEN, DIM], p + "mlp.up_proj.weight": [HIDDEN, DIM],
                       p + "mlp.down_proj.weight": [DIM, HIDDEN]})
    return shapes


def safetensors_bytes(shapes: dict[str, list[int]], dtype: str = "F32", **lie: dict) -> bytes:
    """A safetensors file of zeros; `lie` replaces header entries by tensor name."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    for name, entry in lie.items():
        header[name.replace("__", ".")] = entry
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(offset)


def hf_dir(config: dict | str | None = None, weights: bytes | None = None,
           extra: dict[str, bytes] | None = None) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        hf = d / "hf"
        text = config if isinstance(config, str) else json.dumps({**HF_CONFIG, **(config or {})})
        write(hf / "config.json", text.encode())
        write(hf / "model.safetensors", safetensors_bytes(_hf_shapes()) if weights is None else weights)
        for name, data in (extra or {}).items():
            write(hf / name, data)
        return hf
    return build


def hf_config(**fields) -> Callable[[Path], Path]:
    return hf_dir({k.replace("__", "."): v for k, v in fields.items()})


def herd_dir(config: dict) -> Callable[[Path], Path]:
    """A herd quantized-checkpoint directory whose manifest declares `config`."""
    full = {"dim": DIM, "n_layers": 1, "n_heads": HEADS, "vocab_size": VOCAB, "hidden_dim": HIDDEN, **config}

    def build(d: Path) -> Path:
        write(d / "q" / "herd.json", json.dumps({"config": full, "layers": {}}).encode())
        write(d / "q" / "model.safetensors", safetensors_bytes({"norm.weight": [DIM]}))
        return d / "q"
    return build


def herd_packed_lie(d: Path) -> Path:
    """A herd quantized checkpoint whose packed wq holds an eighth of the rows the C kernels would read."""
    import torch
    from safetensors.torch import save_file

    from herd.config import ModelConfig
    from herd.model.transformer import Transformer

    cfg = ModelConfig(dim=64, n_layers=1, n_heads=2, vocab_size=VOCAB, hidden_dim=64)
    tensors = {k: v.detach().contiguous() for k, v in Transformer(cfg).state_dict().items()
               if k != "layers.0.attention.wq.weight"}
    tensors["layers.0.attention.wq.qweight"] = torch.zeros(8, 64, dtype=torch.int8)
    tensors["layers.0.attention.wq.scales"] = torch.ones(8, 2, dtype=torch.float16)
    manifest = {"config": cfg.to_dict(), "layers": {"layers.0.attention.wq": {"format": "q8", "group_size": 32}}}
    write(d / "q" / "herd.json", json.dumps(manifest).encode())
    save_file(tensors, str(d / "q" / "model.safetensors"))
    return d / "q"


META_PARAMS = {"dim": DIM, "n_layers": 1, "n_heads": HEADS, "vocab_size": VOCAB, "multiple_of": 16,
               "ffn_dim_multiplier": 0.7,
               "norm_eps": 1e-5}


def _meta_state_dict() -> dict:
    import torch

    names = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight"}
    layer = {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
             "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
             "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3"}
    sd = {}
    for hf, shape in _hf_shapes().items():
        if hf in names:
            sd[names[hf]] = torch.zeros(shape)
        else:
            part = hf.removeprefix("model.layers.0.").removesuffix(".weight")
            sd[f"layers.0.{layer[part]}.weight"] = torch.zeros(shape)
    sd["output.weight"] = torch.ones(VOCAB, DIM)
    return sd


class Payload:
    """Unpickles to a call that creates the file `marker`: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def meta_dir(params: dict | str | None = None, pth: Callable[[Path], None] | None = None) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        import torch

        m = d / "meta"
        m.mkdir(parents=True, exist_ok=True)
        text = params if isinstance(params, str) else json.dumps({**META_PARAMS, **(params or {})})
        (m / "params.json").write_text(text)
        file = m / "consolidated.00.pth"
        if pth is None:
            torch.save(_meta_state_dict(), file)
        else:
            pth(file)
        return m
    return build


def _legacy_pth(file: Path) -> None:
    import torch

    torch.save(_meta_state_dict(), file, _use_new_zipfile_serialization=False)


def _plain_pickle(file: Path) -> None:
    file.write_bytes(pickle.dumps({k: v.numpy() for k, v in _meta_state_dict().items()}))


def _pickle_running_code(file: Path) -> None:
    file.write_bytes(pickle.dumps({"tok_embeddings.weight": Payload(str(file.parent.parent / "PWNED"))}))


def _zip_pickle_running_code(file: Path) -> None:
    import torch

    torch.save({**_meta_state_dict(), "evil": Payload(str(file.parent.parent / "PWNED"))}, file)


def _short_record(file: Path) -> None:
    """A zip-format .pth whose tensor's data record holds 100 of the bytes its pickle claims."""
    import zipfile

    torch_save = meta_dir()
    full = torch_save(file.parent.parent / "full") / "consolidated.00.pth"
    with zipfile.ZipFile(full) as src, zipfile.ZipFile(file, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            dst.writestr(info, data[:100] if "/data/" in info.filename else data)


def _integer_weights(file: Path) -> None:
    import torch

    torch.save({k: v.long() for k, v in _meta_state_dict().items()}, file)


def _not_tensors(file: Path) -> None:
    import torch

    torch.save({"tok_embeddings.weight": [1, 2, 3], "norm.weight": "text"}, file)


# --- llama2.c ------------------------------------------------------------------------------------

def llama2c(*header: int, floats: int = 0) -> Callable[[Path], Path]:
    return lambda d: write(d / "model.bin", struct.pack("<7i", *header) + bytes(4 * floats))


def _llama2c_floats(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len) -> int:
    head = dim // n_heads
    kv = n_kv_heads * head
    per_layer = 2 * dim + 2 * dim * dim + 2 * kv * dim + 3 * dim * hidden
    return abs(vocab) * dim * (1 + (vocab < 0)) + n_layers * per_layer + dim + seq_len * head


# --- the corpus: name -> (builder, words the error must contain) ---------------------------------

BIG = 2**60
CASES: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    # GGUF: header
    "gguf_bad_magic": (gguf_bytes(b"GGUX" + b"".join(gguf_parts())[4:]), ("unknown checkpoint format",)),
    "gguf_version_1": (gguf(version=1), ("GGUF", "version 1")),
    "gguf_version_huge": (gguf(version=2**32 - 1), ("GGUF", "version")),
    "gguf_only_magic": (gguf_bytes(b"GGUF"), ("GGUF", "truncated")),
    "gguf_cut_in_counts": (gguf_cut(0, 13), ("GGUF", "truncated")),
    "gguf_cut_in_metadata_key": (gguf_cut(1, 10), ("GGUF", "truncated")),
    "gguf_cut_in_metadata_value": (gguf_cut(2, len(_u32("llama.embedding_length", 8)) - 2), ("GGUF", "truncated")),
    "gguf_cut_in_tensor_info": (gguf_cut(1 + len(_llama_kvs()) + 3, 20), ("GGUF", "truncated")),
    "gguf_cut_in_data": (gguf_bytes(b"".join(gguf_parts())[:-300]), ("GGUF", "past the end")),
    "gguf_lying_kv_count": (gguf(n_kv=2**40), ("GGUF", "metadata")),
    "gguf_lying_tensor_count": (gguf(n_tensors=2**62), ("GGUF", "tensors")),
    # GGUF: metadata values
    "gguf_array_2_60_u8": (gguf(kvs=[_array("a", 0, BIG)], tensors=[]), ("GGUF", "array")),
    "gguf_array_2_60_strings": (gguf(kvs=[_array("a", STR, BIG)], tensors=[]), ("GGUF", "array")),
    "gguf_array_2_60_arrays": (gguf(kvs=[_array("a", ARR, BIG, struct.pack("<IQ", 0, 0) * 3)], tensors=[]),
                               ("GGUF", "array")),
    "gguf_array_in_llama_model": (gguf(kvs=_llama_kvs(tok=_array("tokenizer.ggml.tokens", STR, BIG))),
                                  ("GGUF", "array")),
    "gguf_lying_key_length": (gguf(kvs=[struct.pack("<Q", BIG) + b"key"], tensors=[]), ("GGUF", "string")),
    "gguf_lying_value_length": (gguf(kvs=[_str("general.name") + struct.pack("<IQ", STR, 2**63)], tensors=[]),
                                ("GGUF", "string")),
    "gguf_unknown_value_type": (gguf(kvs=[_kv("a", 77, b"")], tensors=[]), ("GGUF", "value type 77")),
    "gguf_alignment_zero": (gguf(kvs=_llama_kvs(align=_u32("general.alignment", 0))), ("GGUF", "alignment")),
    "gguf_alignment_string": (gguf(kvs=_llama_kvs(align=_kv("general.alignment", STR, _str("x")))),
                              ("GGUF", "alignment")),
    # GGUF: tensor infos
    "gguf_n_dims_2_31": (_tensor_lie("token_embd.weight", [DIM, VOCAB], n_dims=2**31), ("GGUF", "dimensions")),
    "gguf_dims_overflow_int64": (_tensor_lie("token_embd.weight", [2**32, 2**32]), ("GGUF", "token_embd.weight")),
    "gguf_dims_huge": (_tensor_lie("token_embd.weight", [2**40, 2**40]), ("GGUF", "token_embd.weight")),
    "gguf_tensor_offset_past_end": (_tensor_lie("token_embd.weight", [DIM, VOCAB], offset=2**50),
                                    ("GGUF", "past the end")),
    "gguf_unknown_tensor_type": (_tensor_lie("token_embd.weight", [DIM, VOCAB], kind=999), ("GGUF", "type 999")),
    "gguf_lying_tensor_name_length": (_tensor_lie("token_embd.weight", [DIM, VOCAB], name_length=2**40),
                                      ("GGUF", "string")),
    # GGUF: the model it describes
    "gguf_block_count_10_6": (gguf(kvs=_llama_kvs(layers=_u32("llama.block_count", 10**6))), ("block_count",)),
    "gguf_block_count_1000": (gguf(kvs=_llama_kvs(layers=_u32("llama.block_count", 1000))), ("1000 layers",)),
    "gguf_embedding_length_2_31": (gguf(kvs=_llama_kvs(dim=_u32("llama.embedding_length", 2**31))),
                                   ("embedding_length",)),
    "gguf_head_count_zero": (gguf(kvs=_llama_kvs(heads=_u32("llama.attention.head_count", 0))),
                             ("head_count",)),
    "gguf_negative_eps": (gguf(kvs=_llama_kvs(eps=_f32("llama.attention.layer_norm_rms_epsilon", -1.0))),
                          ("layer_norm_rms_epsilon",)),
    "gguf_zero_rope_theta": (gguf(kvs=_llama_kvs(theta=_f32("llama.rope.freq_base", 0.0))), ("freq_base",)),
    "gguf_nan_rope_theta": (gguf(kvs=_llama_kvs(theta=_f32("llama.rope.freq_base", math.nan))), ("freq_base",)),
    "gguf_empty_rope_freqs": (gguf(tensors=[*_llama_tensors(), ("rope_freqs.weight", [0])]), ("rope_freqs",)),
    "gguf_tokens_not_strings": (gguf(kvs=_llama_kvs(model=_kv("tokenizer.ggml.model", STR, _str("llama")),
                                                    tok=_array("tokenizer.ggml.tokens", U32, 2, bytes(8)))),
                                ("tokenizer.ggml.tokens",)),
    "gguf_token_types_strings": (gguf(kvs=_llama_kvs(
        model=_kv("tokenizer.ggml.model", STR, _str("llama")),
        tok=_array("tokenizer.ggml.tokens", STR, 2, _str("a") + _str("b")),
        types=_array("tokenizer.ggml.token_type", STR, 2, _str("a") + _str("b")))), ("tokenizer.ggml.token_type",)),
    "gguf_scores_strings": (gguf(kvs=_llama_kvs(
        model=_kv("tokenizer.ggml.model", STR, _str("llama")),
        tok=_array("tokenizer.ggml.tokens", STR, 2, _str("a") + _str("b")),
        scores=_array("tokenizer.ggml.scores", STR, 2, _str("a") + _str("b")))), ("tokenizer.ggml.scores",)),
    "gguf_merges_not_strings": (gguf(kvs=_llama_kvs(
        model=_kv("tokenizer.ggml.model", STR, _str("gpt2")),
        tok=_array("tokenizer.ggml.tokens", STR, 2, _str("a") + _str("b")),
        merges=_array("tokenizer.ggml.merges", U32, 2, bytes(8)))), ("tokenizer.ggml.merges",)),
    # safetensors beside a good config.json
    "st_header_length_2_62": (hf_dir(weights=struct.pack("<Q", 2**62) + b"{}"), ("safetensors",)),
    "st_header_longer_than_file": (hf_dir(weights=struct.pack("<Q", 1000) + b"{}"), ("safetensors",)),
    "st_header_not_json": (hf_dir(weights=struct.pack("<Q", 16) + b"{not json at al"), ("safetensors",)),
    "st_header_deep_json": (hf_dir(weights=struct.pack("<Q", 200000) + b"[" * 100000 + b"]" * 100000),
                            ("safetensors",)),
    "st_offsets_past_end": (hf_dir(weights=safetensors_bytes(_hf_shapes(), model__norm__weight={
        "dtype": "F32", "shape": [DIM], "data_offsets": [2**40, 2**40 + 32]})), ("safetensors",)),
    "st_dtype_lie": (hf_dir(weights=safetensors_bytes(_hf_shapes(), model__norm__weight={
        "dtype": "F64", "shape": [DIM], "data_offsets": [0, 32]})), ("safetensors",)),
    "st_shape_huge": (hf_dir(weights=safetensors_bytes(_hf_shapes(), model__norm__weight={
        "dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 32]})), ("safetensors",)),
    "st_integer_weights": (hf_dir(weights=safetensors_bytes(_hf_shapes(), dtype="I32")), ("I32",)),
    "st_wrong_shape": (hf_dir(weights=safetensors_bytes({**_hf_shapes(), "model.norm.weight": [2 * DIM]})),
                       ("norm.weight", f"[{2 * DIM}]")),
    # config.json
    "hf_config_not_json": (hf_dir(config="{'hidden_size': 8"), ("config.json", "JSON")),
    "hf_config_a_list": (hf_dir(config="[1, 2, 3]"), ("config.json", "JSON object")),
    "hf_layers_10_6": (hf_config(num_hidden_layers=10**6), ("num_hidden_layers",)),
    "hf_layers_1000": (hf_config(num_hidden_layers=1000), ("1000 layers",)),
    "hf_hidden_size_2_40": (hf_config(hidden_size=2**40), ("hidden_size",)),
    "hf_hidden_size_negative": (hf_config(hidden_size=-8), ("hidden_size",)),
    "hf_vocab_zero": (hf_config(vocab_size=0), ("vocab_size",)),
    "hf_layers_string": (hf_config(num_hidden_layers="2"), ("num_hidden_layers",)),
    "hf_layers_true": (hf_config(num_hidden_layers=True), ("num_hidden_layers",)),
    "hf_eps_zero": (hf_config(rms_norm_eps=0), ("rms_norm_eps",)),
    "hf_eps_nan": (hf_config(rms_norm_eps=math.nan), ("rms_norm_eps",)),
    "hf_theta_negative": (hf_config(rope_theta=-1), ("rope_theta",)),
    "hf_theta_infinite": (hf_config(rope_theta=math.inf), ("rope_theta",)),
    "hf_heads_do_not_divide": (hf_config(num_attention_heads=3), ("num_attention_heads",)),
    "hf_kv_heads_do_not_divide": (hf_config(num_key_value_heads=3), ("num_key_value_heads",)),
    "hf_context_2_62": (hf_config(max_position_embeddings=2**62), ("max_position_embeddings",)),
    "hf_rope_scaling_infinite": (hf_config(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": math.inf}), ("rope",)),
    "hf_rope_factor_zero": (hf_config(rope_scaling={
        "rope_type": "llama3", "factor": 0.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}), ("factor",)),
    "hf_params_beyond_file": (hf_config(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                        num_key_value_heads=32, vocab_size=32000), ("parameters",)),
    "hf_llama4_layers_10_9": (hf_dir({"model_type": "llama4_text", "architectures": ["Llama4ForCausalLM"],
                                      "num_hidden_layers": 10**9, "intermediate_size_mlp": HIDDEN,
                                      "num_local_experts": 2, "moe_layers": [1]}), ("num_hidden_layers",)),
    "hf_llama4_moe_layers_not_a_list": (hf_dir({"model_type": "llama4_text", "architectures": ["Llama4ForCausalLM"],
                                                "intermediate_size_mlp": HIDDEN, "num_local_experts": 2,
                                                "moe_layers": 5}), ("moe_layers",)),
    "hf_index_outside_directory": (hf_dir(extra={"model.safetensors.index.json": json.dumps(
        {"weight_map": {"model.norm.weight": "../../../../etc/passwd"}}).encode()}), ("weight_map", "../")),
    "hf_template_not_utf8": (hf_dir(extra={"chat_template.jinja": b"\xff\xfe{{ bad }}"}), ("chat_template.jinja",)),
    # Meta
    "meta_legacy_pth": (meta_dir(pth=_legacy_pth), ("legacy", "zip")),
    "meta_plain_pickle": (meta_dir(pth=_plain_pickle), ("legacy", "zip")),
    "meta_plain_pickle_running_code": (meta_dir(pth=_pickle_running_code), ("legacy", "zip")),
    "meta_zip_pickle_running_code": (meta_dir(pth=_zip_pickle_running_code), ("refused", "could run code")),
    "meta_empty_pth": (meta_dir(pth=lambda f: f.write_bytes(b"")), ("consolidated.00.pth",)),
    "meta_zip_record_short": (meta_dir(pth=_short_record), ("consolidated.00.pth", "corrupt")),
    "meta_integer_weights": (meta_dir(pth=_integer_weights), ("torch.int64",)),
    "meta_not_tensors": (meta_dir(pth=_not_tensors), ("consolidated.00.pth",)),
    "meta_params_not_json": (meta_dir(params="{dim: 8}"), ("params.json", "JSON")),
    "meta_layers_10_6": (meta_dir({"n_layers": 10**6}), ("n_layers",)),
    "meta_layers_1000": (meta_dir({"n_layers": 1000}), ("1000 layers",)),
    "meta_multiple_of_zero": (meta_dir({"multiple_of": 0}), ("multiple_of",)),
    "meta_ffn_multiplier_nan": (meta_dir({"ffn_dim_multiplier": math.nan}), ("ffn_dim_multiplier",)),
    "meta_ffn_multiplier_huge": (meta_dir({"ffn_dim_multiplier": 1e300}), ("ffn_dim_multiplier",)),
    "meta_eps_negative": (meta_dir({"norm_eps": -1e-5}), ("norm_eps",)),
    "meta_theta_zero": (meta_dir({"rope_theta": 0}), ("rope_theta",)),
    "meta_dim_2_40": (meta_dir({"dim": 2**40}), ("dim",)),
    # llama2.c
    "llama2c_negative_dim": (llama2c(-8, 16, 1, 2, 2, 16, 64, floats=1000), ("unknown checkpoint format",)),
    "llama2c_huge_dims": (llama2c(2**30, 2**30, 2**30, 2, 2, 2**30, 2**30, floats=10), ("truncated",)),
    "llama2c_huge_layers": (llama2c(8, 16, 2**31 - 1, 2, 2, 16, 64, floats=1000), ("truncated",)),
    "llama2c_header_only": (llama2c(8, 16, 1, 2, 2, 16, 64), ("truncated",)),
    "llama2c_truncated": (llama2c(8, 16, 1, 2, 2, 16, 64, floats=_llama2c_floats(8, 16, 1, 2, 2, 16, 64) - 1),
                          ("truncated",)),
    "llama2c_context_2_31": (llama2c(8, 16, 1, 2, 2, 16, 2**31 - 1, floats=10), ("truncated",)),
    # herd quantized checkpoints
    "herd_layers_10_6": (herd_dir({"n_layers": 10**6}), ("n_layers",)),
    "herd_dim_2_40": (herd_dir({"dim": 2**40}), ("dim",)),
    "herd_eps_zero": (herd_dir({"norm_eps": 0.0}), ("norm_eps",)),
    "herd_packed_shape_lie": (herd_packed_lie, ("layers.0.attention.wq", "qweight")),
}

# Files run as their own `python -m herd` process in the default run, one per kind of danger.
REPRESENTATIVE = ("gguf_array_2_60_u8", "hf_layers_1000", "meta_plain_pickle_running_code")


def argvs(path: Path) -> list[list[str]]:
    """The commands that load `path`: GGUF files both dequantized and with their quants kept."""
    base = ["generate", "-m", str(path), "hi", "-n", "1"]
    return [base, [*base, "--quantize", "keep"]] if path.suffix == ".gguf" else [base]


def limit_resources() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES))


def check(name: str, rc: int, stderr: str, seconds: float, marker: Path) -> list[str]:
    """What is wrong with how the command line refused case `name` (empty: nothing)."""
    problems = []
    lines = stderr.strip().splitlines()
    if rc != 2:
        problems.append(f"exit code {rc}")
    if len(lines) != 1 or "Traceback" in stderr or "internal error" in stderr:
        problems.append("not one line of error")
    missing = [w for w in CASES[name][1] if w not in stderr]
    if missing:
        problems.append(f"does not say {missing}")
    if seconds > LIMIT_SECONDS:
        problems.append(f"took {seconds:.1f} s")
    if marker.exists():
        problems.append("a pickle ran code")
    return [f"{name}: {p}: {stderr.strip()[-300:]!r}" for p in problems]


class _Timeout(BaseException):
    pass


def _on_alarm(signum, frame):
    raise _Timeout


def _run_in_process(argv: list[str]) -> tuple[int, str]:
    """herd.cli.main(argv) with file descriptor 2 captured, stopped after LIMIT_SECONDS."""
    import signal
    import tempfile

    from herd.cli import main

    with tempfile.TemporaryFile() as err:
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(LIMIT_SECONDS + 1)
        try:
            rc = main(argv)
        except _Timeout:
            rc = 124
        except SystemExit as e:
            rc = e.code
        finally:
            signal.alarm(0)
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        return rc, err.read().decode(errors="replace")


def drive(manifest: Path) -> None:
    """The subprocess: run every case of the manifest through the CLI, one JSON line each."""
    limit_resources()
    for name, path in json.loads(manifest.read_text()).items():
        for argv in argvs(Path(path)):
            start = time.monotonic()
            rc, stderr = _run_in_process(argv)
            print(json.dumps({"name": name, "argv": argv, "rc": rc, "stderr": stderr,
                              "seconds": time.monotonic() - start}), flush=True)


if __name__ == "__main__":
    drive(Path(sys.argv[1]))
    sys.exit(0)


import pytest  # only here: the script above needs only the standard library and herd


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_files")
    return {name: build(root / name) for name, (build, _) in CASES.items()}


def test_corpus_is_large_and_across_formats():
    assert len(CASES) >= 40
    kinds = {name.split("_")[0] for name in CASES}
    assert kinds >= {"gguf", "st", "hf", "meta", "llama2c", "herd"}


def test_the_untampered_files_load(tmp_path):
    """The corpus's files are lies about files that load: the errors come from the lies."""
    from herd.checkpoint import load_checkpoint
    from herd.checkpoint.gguf_packed import load_gguf_packed

    for i, build in enumerate((gguf(), hf_dir(), meta_dir())):
        ckpt = load_checkpoint(build(tmp_path / str(i)))
        assert ckpt.config.dim == DIM and ckpt.config.n_layers == 1
    load_gguf_packed(gguf()(tmp_path / "packed"))
    floats = _llama2c_floats(8, 16, 1, 2, 2, 16, 64)
    assert load_checkpoint(llama2c(8, 16, 1, 2, 2, 16, 64, floats=floats)(tmp_path / "l2c")).config.dim == 8


def test_every_file_is_refused_in_one_line_within_bounds(corpus, tmp_path):
    """Every file through herd's command line in one subprocess limited to 4 GiB of address space."""
    manifest = tmp_path / "cases.json"
    manifest.write_text(json.dumps({name: str(path) for name, path in corpus.items()}))
    out = subprocess.run([sys.executable, __file__, str(manifest)], capture_output=True, text=True, check=False,
                         timeout=LIMIT_SECONDS * 2 * len(CASES))
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    problems = [p for r in results for p in check(r["name"], r["rc"], r["stderr"], r["seconds"],
                                                  corpus[r["name"]].parent / "PWNED")]
    ran = {r["name"] for r in results}
    problems += [f"{name}: not run (the subprocess died: {out.stderr[-300:]!r})" for name in CASES if name not in ran]
    assert not problems, "\n".join(problems)


def _one_process(corpus, name: str) -> None:
    for argv in argvs(corpus[name]):
        start = time.monotonic()
        try:
            out = subprocess.run([sys.executable, "-m", "herd", *argv], capture_output=True, text=True, check=False,
                                 timeout=LIMIT_SECONDS, preexec_fn=limit_resources)
            rc, stderr = out.returncode, out.stderr
        except subprocess.TimeoutExpired:
            rc, stderr = 124, ""
        problems = check(name, rc, stderr, time.monotonic() - start, corpus[name].parent / "PWNED")
        assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_representative_files_as_their_own_process(corpus, name):
    _one_process(corpus, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(CASES) - set(REPRESENTATIVE)))
def test_every_file_as_its_own_process(corpus, name):
    _one_process(corpus, name)
