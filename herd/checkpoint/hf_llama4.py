"""Hugging Face Llama 4 text weights: `Llama4ForCausalLM` directories, and the language model
inside `Llama4ForConditionalGeneration` ones (the released Scout and Maverick checkpoints),
whose vision tower is skipped.

Unlike HF's Llama 1-3, HF's Llama 4 rotates interleaved pairs, so q/k rows load as they are.
Experts are stored fused: `gate_up_proj` [experts, dim, 2 * hidden] (gate first) and
`down_proj` [experts, hidden, dim], already in herd's `x @ w` orientation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from herd.checkpoint.base import Checkpoint, check_fits, check_shapes, directory_extras, make_config
from herd.checkpoint.hf import HF_KEYS, held, open_safetensors, rope_from_hf, tensor_headers, weight_files
from herd.config import MAX_LAYERS, AttnTemperature, ModelConfig, MoE
from herd.errors import HerdError

_DENSE = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_ATTENTION = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo"}


def _text_config(path: Path, hf: dict) -> tuple[dict, str]:
    """(the text model's config, the prefix of its tensor names)."""
    if hf.get("model_type") == "llama4_text":
        return hf, ""
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise HerdError(f"{path}: a llama4 config.json needs a text_config object")
    return text, "language_model."


def _step(path: Path, name: str, flags: list[bool]) -> int:
    """The n for which flags[i] is (i + 1) % n == 0 (0: no flag set); a pattern no step gives is an error."""
    if not any(flags):
        return 0
    step = flags.index(True) + 1
    if flags != [(i + 1) % step == 0 for i in range(len(flags))]:
        raise HerdError(f"{path}: {name} sets layers {[i for i, f in enumerate(flags) if f]}, not every "
                        f"{step}th layer; herd supports only the regular interleaving of the released models")
    return step


def config_from_hf_llama4(path: Path, hf: dict) -> tuple[ModelConfig, str]:
    text, prefix = _text_config(path, hf)
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                           "intermediate_size", "intermediate_size_mlp", "num_local_experts") if k not in text]
    if missing:
        raise HerdError(f"{path}: the Llama 4 config lacks {', '.join(missing)}")
    if text.get("attention_bias"):
        raise HerdError(f"{path}: attention_bias=true is not supported (Llama has no biases)")
    if text.get("hidden_act", "silu") != "silu":
        raise HerdError(f"{path}: hidden_act {text['hidden_act']!r} is not supported (only silu)")
    n_layers = text["num_hidden_layers"]
    if not isinstance(n_layers, int) or isinstance(n_layers, bool) or not 0 < n_layers <= MAX_LAYERS:
        raise HerdError(f"{path}: num_hidden_layers must be a positive integer up to {MAX_LAYERS}, got {n_layers!r}")

    moe_step = text.get("interleave_moe_layer_step", 1)
    moe_layers = text.get("moe_layers")
    if moe_layers is not None:
        if not isinstance(moe_layers, list):
            raise HerdError(f"{path}: moe_layers must list layer numbers, got {moe_layers!r}")
        moe_step = _step(path, "moe_layers", [i in moe_layers for i in range(n_layers)])
    nope_step = text.get("no_rope_layer_interval", 4)
    rope_flags = text.get("no_rope_layers")  # despite the name, 1 marks a layer WITH rotary embeddings
    if rope_flags is not None:
        if not isinstance(rope_flags, list) or len(rope_flags) != n_layers:
            raise HerdError(f"{path}: no_rope_layers must list one flag per layer")
        nope_step = _step(path, "no_rope_layers", [not f for f in rope_flags])
    chunk = text.get("attention_chunk_size")
    max_pos = text.get("max_position_embeddings", 4096 * 32)
    theta, scaling = rope_from_hf(path, {"rope_theta": 500000.0, **text}, max_pos)
    try:
        norm_eps = float(text.get("rms_norm_eps", 1e-5))
        temperature = AttnTemperature(floor_scale=float(text.get("floor_scale", 8192)),
                                      attn_scale=float(text.get("attn_scale", 0.1)))
    except (TypeError, ValueError):
        raise HerdError(f"{path}: rms_norm_eps, floor_scale and attn_scale must be numbers") from None
    cfg = make_config(
        path, {**HF_KEYS, "hidden_dim": "intermediate_size_mlp"},
        dim=text["hidden_size"], n_layers=n_layers, n_heads=text["num_attention_heads"],
        n_kv_heads=text.get("num_key_value_heads"), vocab_size=text["vocab_size"],
        hidden_dim=text["intermediate_size_mlp"], norm_eps=norm_eps, rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=bool(text.get("tie_word_embeddings", False)), max_seq_len=max_pos,
        name=path.resolve().name, family="llama4",
        moe=MoE(n_experts=text["num_local_experts"], hidden_dim=text["intermediate_size"],
                top_k=text.get("num_experts_per_tok", 1), layer_step=moe_step) if moe_step else None,
        nope_layer_step=nope_step, attention_chunk_size=chunk, qk_norm=bool(text.get("use_qk_norm", True)),
        attn_temperature=temperature if text.get("attn_temperature_tuning", True) else None,
    )
    head_dim = text.get("head_dim")
    if head_dim is not None and head_dim != cfg.head_dim:
        raise HerdError(f"{path}: head_dim {head_dim!r} differs from hidden_size / num_attention_heads "
                        f"= {cfg.head_dim}, which herd does not support")
    return cfg, prefix


def _herd_names(name: str) -> list[tuple[str, str | None]]:
    """herd tensor name(s) for an HF Llama 4 text tensor name (prefix removed), each with the half
    of a fused gate/up tensor it takes ("gate", "up" or None: all); [] for a name herd does not know."""
    if name == "model.embed_tokens.weight":
        return [("tok_embeddings.weight", None)]
    if name == "model.norm.weight":
        return [("norm.weight", None)]
    if name == "lm_head.weight":
        return [("output.weight", None)]
    parts = name.split(".")
    if parts[:2] != ["model", "layers"] or len(parts) < 5:
        return []
    layer, rest = f"layers.{parts[2]}", ".".join(parts[3:])
    if rest == "input_layernorm.weight":
        return [(f"{layer}.attention_norm.weight", None)]
    if rest == "post_attention_layernorm.weight":
        return [(f"{layer}.ffn_norm.weight", None)]
    if parts[3] == "self_attn" and parts[4] in _ATTENTION and parts[5:] == ["weight"]:
        return [(f"{layer}.attention.{_ATTENTION[parts[4]]}.weight", None)]
    if parts[3] == "feed_forward":
        tail = parts[4:]
        if tail == ["router", "weight"]:
            return [(f"{layer}.feed_forward.router.weight", None)]
        if tail == ["experts", "gate_up_proj"]:
            return [(f"{layer}.feed_forward.experts.w1", "gate"), (f"{layer}.feed_forward.experts.w3", "up")]
        if tail == ["experts", "down_proj"]:
            return [(f"{layer}.feed_forward.experts.w2", None)]
        if len(tail) == 3 and tail[0] == "shared_expert" and tail[1] in _DENSE and tail[2] == "weight":
            return [(f"{layer}.feed_forward.shared_expert.{_DENSE[tail[1]]}.weight", None)]
        if len(tail) == 2 and tail[0] in _DENSE and tail[1] == "weight":
            return [(f"{layer}.feed_forward.{_DENSE[tail[0]]}.weight", None)]
    return []


def _shapes(cfg: ModelConfig, prefix: str, headers: dict[str, tuple[Path, tuple[int, ...]]]) -> dict[str, tuple]:
    """herd name -> shape of each tensor the text model's headers describe (fused gate/up halved)."""
    shapes = {}
    for hf_name, (file, shape) in headers.items():
        targets = _herd_names(hf_name[len(prefix):])
        if not targets:
            raise HerdError(f"{file}: unexpected tensor {hf_name} for a Llama 4 text model")
        for name, half in targets:
            if half is not None and (len(shape) != 3 or shape[-1] % 2):
                raise HerdError(f"{file}: {hf_name} has shape {list(shape)}, not [experts, dim, 2 * hidden]")
            if not (name == "output.weight" and cfg.tie_embeddings):
                shapes[name] = shape if half is None else (*shape[:-1], shape[-1] // 2)
    return shapes


def load_hf_llama4(path: Path, hf: dict, dtype: torch.dtype | None = None, tokenizer: bool = True) -> Checkpoint:
    cfg, prefix = config_from_hf_llama4(path, hf)
    # the vision tower and projector of a multimodal checkpoint are skipped
    headers = {name: h for name, h in tensor_headers(weight_files(path)).items() if name.startswith(prefix)}
    check_fits(path, cfg, *held(headers))
    check_shapes(path, cfg, _shapes(cfg, prefix, headers))
    state_dict: dict[str, torch.Tensor] = {}
    for file in dict.fromkeys(file for file, _ in headers.values()):
        with open_safetensors(file) as f:
            for hf_name in f.keys():
                if hf_name not in headers:
                    continue
                t = f.get_tensor(hf_name)
                for name, half in _herd_names(hf_name[len(prefix):]):
                    if name == "output.weight" and cfg.tie_embeddings:
                        continue
                    part = t if half is None else t.chunk(2, dim=-1)[0 if half == "gate" else 1].contiguous()
                    state_dict[name] = part if dtype is None else part.to(dtype)
    tok, template, eos = directory_extras(path, tokenizer)
    return Checkpoint(cfg, state_dict, "hf", path, tok, template, eos)
