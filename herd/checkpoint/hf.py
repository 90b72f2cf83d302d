"""Hugging Face checkpoints: a directory with config.json (LlamaForCausalLM) and safetensors
weights, one file or several shards listed in model.safetensors.index.json.

HF orders each head's q/k rows as [all first halves of the rotary pairs, all second halves]
("rotate half"); herd's model rotates interleaved pairs as Meta's code does, so the rows of
wq/wk are permuted on the way in and back on the way out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from herd.checkpoint.base import (Checkpoint, check_fits, check_shapes, check_state_dict, check_writable,
                                  directory_extras, make_config, one_line, read_json, with_family)
from herd.config import ModelConfig, RopeScaling
from herd.errors import HerdError

_LAYER_NAMES = {
    "input_layernorm.weight": "attention_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
}


# herd's config field -> the config.json key it comes from, to name it in errors
HF_KEYS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
           "n_kv_heads": "num_key_value_heads", "hidden_dim": "intermediate_size", "norm_eps": "rms_norm_eps",
           "max_seq_len": "max_position_embeddings"}
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def hf_names(n_layers: int) -> dict[str, str]:
    """HF tensor name -> herd tensor name, in the order transformers writes them."""
    names = {"model.embed_tokens.weight": "tok_embeddings.weight"}
    for i in range(n_layers):
        names.update({f"model.layers.{i}.{hf}": f"layers.{i}.{ours}" for hf, ours in _LAYER_NAMES.items()})
    names.update({"model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"})
    return names


def hf_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from HF's rotate-half order to Meta's interleaved pairs."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def interleaved_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `hf_to_interleaved`."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _heads_of(name: str, cfg: ModelConfig) -> int | None:
    """How many heads' rows a tensor holds if it is a rotary (q or k) projection."""
    if name.endswith("attention.wq.weight"):
        return cfg.n_heads
    if name.endswith("attention.wk.weight"):
        return cfg.n_kv_heads
    return None


def config_from_hf(path: Path, hf: dict) -> ModelConfig:
    """ModelConfig from a config.json of transformers 4.x (rope_theta + rope_scaling) or 5.x
    (rope_parameters); missing optional fields take LlamaConfig's defaults."""
    arch = hf.get("architectures") or []
    if "LlamaForCausalLM" not in arch and hf.get("model_type") != "llama":
        raise HerdError(f"{path}: unsupported architecture {arch or hf.get('model_type')!r} "
                        "(only LlamaForCausalLM is supported)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise HerdError(f"{path}: {flag}=true is not supported (Llama has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise HerdError(f"{path}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if k not in hf]
    if missing:
        raise HerdError(f"{path}: config.json lacks {', '.join(missing)}")

    max_pos = hf.get("max_position_embeddings", 2048)
    theta, scaling = rope_from_hf(path, hf, max_pos)
    try:
        norm_eps = float(hf.get("rms_norm_eps", 1e-6))
    except (TypeError, ValueError):
        raise HerdError(f"{path}: rms_norm_eps must be a number") from None
    cfg = make_config(
        path, HF_KEYS,
        dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads"), vocab_size=hf["vocab_size"], hidden_dim=hf["intermediate_size"],
        norm_eps=norm_eps, rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), max_seq_len=max_pos,
        name=path.resolve().name,
    )
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != cfg.head_dim:
        raise HerdError(f"{path}: head_dim {head_dim!r} differs from hidden_size / num_attention_heads "
                        f"= {cfg.head_dim}, which herd does not support")
    return with_family(cfg)


def rope_from_hf(path: Path, hf: dict, max_pos: int) -> tuple[float, RopeScaling | None]:
    """(rope theta, llama3 scaling or None) from transformers 4.x or 5.x config fields."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise HerdError(f"{path}: rope parameters must be a JSON object, got {rope!r}")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if kind == "llama3":
        try:
            scaling = RopeScaling(factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                                  high_freq_factor=float(rope["high_freq_factor"]),
                                  original_max_position=int(rope.get("original_max_position_embeddings", max_pos)))
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise HerdError(f"{path}: llama3 rope scaling is incomplete or invalid ({e!r})") from None
    elif kind != "default":
        raise HerdError(f"{path}: rope type {kind!r} is not supported (only default and llama3)")
    try:
        return float(theta), scaling
    except (TypeError, ValueError):
        raise HerdError(f"{path}: rope_theta must be a number") from None


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise HerdError(f"{index}: no weight_map object")
        names = list(dict.fromkeys(weight_map.values()))
        outside = [n for n in names if not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..")]
        if outside:
            raise HerdError(f"{index}: weight_map may name only files in its directory, got {outside[0]!r}")
        files = [path / name for name in names]
        for f in files:
            if not f.exists():
                raise HerdError(f"{index}: lists {f.name}, which is missing")
        return files
    return sorted(path.glob("*.safetensors"))


@contextmanager
def open_safetensors(file: Path) -> Iterator[Any]:
    """safetensors' reader of `file`, its errors made one-line ones that name the file."""
    try:
        with safe_open(file, framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise HerdError(f"{file}: corrupt or truncated safetensors file ({one_line(str(e))})") from None


def tensor_headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Name -> (file, shape) of every tensor in safetensors `files`, from their headers alone (the
    reader checks each header against its file's size); a tensor that is not floating point is refused."""
    headers: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in files:
        with open_safetensors(file) as f:
            for name in f.keys():
                if not name.isprintable():
                    raise HerdError(f"{file}: tensor name {name[:100]!r} is not printable text")
                if name in headers:
                    raise HerdError(f"{file}: tensor {name} is also in {headers[name][0].name}")
                view = f.get_slice(name)
                if view.get_dtype() not in _FLOAT_DTYPES:
                    raise HerdError(f"{file}: tensor {name} is {view.get_dtype()}, not floating point")
                headers[name] = (file, tuple(view.get_shape()))
    return headers


def held(headers: dict[str, tuple[Path, tuple[int, ...]]]) -> tuple[int, int]:
    """(tensors, values) the checkpoint holds, for `check_fits`."""
    return len(headers), sum(math.prod(shape) for _, shape in headers.values())


def load_hf(path: Path, hf: dict, dtype: torch.dtype | None = None, tokenizer: bool = True) -> Checkpoint:
    """A Llama 1-3 HF directory whose config.json holds `hf`."""
    cfg = config_from_hf(path, hf)
    headers = {name: h for name, h in tensor_headers(weight_files(path)).items()
               if not name.endswith("rotary_emb.inv_freq")}  # recomputed; old checkpoints saved it
    check_fits(path, cfg, *held(headers))
    names = hf_names(cfg.n_layers)
    if cfg.tie_embeddings:
        names.pop("lm_head.weight")
    for hf_name, (file, _) in headers.items():
        if hf_name not in names and not (hf_name == "lm_head.weight" and cfg.tie_embeddings):
            raise HerdError(f"{file}: unexpected tensor {hf_name} for a {cfg.n_layers}-layer Llama")
    check_shapes(path, cfg, {names[n]: shape for n, (_, shape) in headers.items() if n in names})
    state_dict: dict[str, torch.Tensor] = {}
    for file in dict.fromkeys(file for file, _ in headers.values()):
        with open_safetensors(file) as f:
            for hf_name in f.keys():
                if hf_name in names:
                    t = f.get_tensor(hf_name)
                    heads = _heads_of(names[hf_name], cfg)
                    t = t if heads is None else hf_to_interleaved(t, heads)
                    state_dict[names[hf_name]] = t if dtype is None else t.to(dtype)
    tok, template, eos = directory_extras(path, tokenizer)
    return Checkpoint(cfg, state_dict, "hf", path, tok, template, eos)


def hf_config_json(cfg: ModelConfig, dtype: torch.dtype, eos_ids: set[int]) -> dict:
    """config.json in the transformers 4.x layout, which transformers 5.x also reads."""
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                              "high_freq_factor": s.high_freq_factor,
                              "original_max_position_embeddings": s.original_max_position}
    if eos_ids:
        hf["eos_token_id"] = sorted(eos_ids) if len(eos_ids) > 1 else next(iter(eos_ids))
    return hf


def save_hf(config: ModelConfig, state_dict: dict[str, torch.Tensor], out_dir: str | Path, *,
            eos_ids: set[int] = frozenset(), max_shard_bytes: int = 5 * 2**30, progress: bool = False) -> Path:
    """Write config.json and safetensors weights that transformers' from_pretrained loads; shards
    of at most `max_shard_bytes` (plus an index) when the weights are larger than that.
    A tied model's output.weight, if present, is not written (transformers re-ties it)."""
    out = Path(out_dir)
    check_writable(out, config)
    sd = {k: v for k, v in state_dict.items() if not (config.tie_embeddings and k == "output.weight")}
    check_state_dict(out, config, sd)
    order = [(hf, ours) for hf, ours in hf_names(config.n_layers).items() if ours in sd]

    shards: list[list[tuple[str, str]]] = [[]]
    size = 0
    for hf, ours in order:
        nbytes = sd[ours].numel() * sd[ours].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((hf, ours))
        size += nbytes

    out.mkdir(parents=True, exist_ok=True)
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    with tqdm(total=len(order), desc=f"writing {out.name}", unit="tensor", disable=not progress) as bar:
        for file, shard in zip(files, shards):
            tensors = {}
            for hf, ours in shard:
                t = sd[ours]
                heads = _heads_of(ours, config)
                tensors[hf] = (t if heads is None else interleaved_to_hf(t, heads)).contiguous()
                weight_map[hf] = file
            save_file(tensors, out / file, metadata={"format": "pt"})
            bar.update(len(shard))
    index_file = out / "model.safetensors.index.json"
    if n > 1:
        total = sum(sd[ours].numel() * sd[ours].element_size() for _, ours in order)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        index_file.write_text(json.dumps(index, indent=2) + "\n")
    else:
        index_file.unlink(missing_ok=True)  # a stale index would point the loader at old shards
    dtype = sd["tok_embeddings.weight"].dtype
    (out / "config.json").write_text(json.dumps(hf_config_json(config, dtype, set(eos_ids)), indent=2) + "\n")
    return out
