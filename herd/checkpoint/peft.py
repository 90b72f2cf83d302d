"""LoRA adapters in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`, Hugging
Face module names), so an adapter trained here loads with `peft` onto transformers'
LlamaForCausalLM and the other way round. herd's wq/wk rows are in Meta's interleaved rotary order
and HF's are in rotate-half order, so the rows of B for q_proj and k_proj are permuted on save and
load (A acts on the input side, which is not permuted).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from herd.checkpoint.hf import hf_to_interleaved, interleaved_to_hf
from herd.config import ModelConfig
from herd.errors import HerdError
from herd.model import Transformer
from herd.model.lora import LoraConfig, adapted_layers, add_adapter, set_adapters

_HF_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
              "gate_proj": "mlp", "down_proj": "mlp", "up_proj": "mlp"}


def _peft_key(layer: int | None, hf: str, matrix: str) -> str:
    if layer is None:
        return f"base_model.model.lm_head.lora_{matrix}.weight"
    return f"base_model.model.model.layers.{layer}.{_HF_PARENT[hf]}.{hf}.lora_{matrix}.weight"


def _rotary_heads(hf: str, cfg: ModelConfig) -> int | None:
    return {"q_proj": cfg.n_heads, "k_proj": cfg.n_kv_heads}.get(hf)


def save_adapter(model: Transformer, out_dir: str | Path, cfg: LoraConfig, name: str = "default",
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write adapter `name` in PEFT's format. `state_dict` (herd names, e.g. gathered from
    sharded ranks) replaces the model's own tensors when given."""
    sd = state_dict if state_dict is not None else model.state_dict()
    tensors = {}
    for path, layer, hf in adapted_layers(model, cfg):
        heads = _rotary_heads(hf, model.config)
        for matrix in ("A", "B"):
            t = sd[f"{path}.adapters.{name}.{matrix}.weight"].detach().to("cpu", torch.float32)
            if matrix == "B" and heads is not None:
                t = interleaved_to_hf(t, heads)
            tensors[_peft_key(layer, hf, matrix)] = t.contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        **cfg.extra,
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": cfg.base_model,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
        "target_modules": sorted(cfg.targets), "layers_to_transform": None if cfg.layers is None else list(cfg.layers),
        "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "use_dora": False,
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True, "init_lora_weights": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_adapter_config(path: Path) -> LoraConfig:
    file = path / "adapter_config.json"
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise HerdError(f"{path}: not a PEFT adapter directory ({e.strerror}: adapter_config.json)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HerdError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise HerdError(f"{file}: not a LoRA adapter (peft_type {raw.get('peft_type') if isinstance(raw, dict) else raw!r})")
    unsupported = [k for k in ("use_dora", "fan_in_fan_out", "modules_to_save", "rank_pattern", "alpha_pattern",
                               "layer_replication", "use_qalora") if raw.get(k)]
    if raw.get("bias", "none") != "none":
        unsupported.append(f"bias={raw['bias']}")
    if unsupported:
        raise HerdError(f"{file}: unsupported LoRA options: {', '.join(map(str, unsupported))}")
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        raise HerdError(f"{file}: target_modules as a regular expression ({targets!r}) is not supported")
    layers = raw.get("layers_to_transform")
    known = {"peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "lora_dropout", "use_rslora",
             "target_modules", "layers_to_transform", "bias", "fan_in_fan_out", "modules_to_save", "use_dora",
             "rank_pattern", "alpha_pattern", "inference_mode", "init_lora_weights"}
    try:
        return LoraConfig(r=raw["r"], alpha=float(raw.get("lora_alpha", 8)), dropout=float(raw.get("lora_dropout", 0)),
                          targets=targets or (), layers=[layers] if isinstance(layers, int) else layers,
                          rslora=bool(raw.get("use_rslora")), base_model=raw.get("base_model_name_or_path") or "",
                          extra={k: v for k, v in raw.items() if k not in known})
    except (KeyError, TypeError, ValueError) as e:
        raise HerdError(f"{file}: invalid LoRA config ({e!r})") from None
    except HerdError as e:
        raise HerdError(f"{file}: {e}") from None


def load_adapter(model: Transformer, path: str | Path, name: str = "default") -> LoraConfig:
    """Add the PEFT adapter in directory `path` to `model` as `name` (and select it)."""
    path = Path(path)
    cfg = read_adapter_config(path)
    file = path / "adapter_model.safetensors"
    if not file.exists():
        raise HerdError(f"{path}: no adapter_model.safetensors (only the safetensors format is supported)")
    try:
        tensors = {k.replace(".default.", "."): v for k, v in load_file(file).items()}
    except SafetensorError as e:
        raise HerdError(f"{file}: corrupt or truncated safetensors file ({e})") from None
    add_adapter(model, cfg, name)
    expected = set()
    for mod_path, layer_idx, hf in adapted_layers(model, cfg):
        lora = model.get_submodule(mod_path).adapters[name]
        heads = _rotary_heads(hf, model.config)
        for matrix, linear in (("A", lora.A), ("B", lora.B)):
            key = _peft_key(layer_idx, hf, matrix)
            expected.add(key)
            t = tensors.get(key)
            if t is None:
                raise HerdError(f"{file}: tensor {key} is missing")
            if tuple(t.shape) != tuple(linear.weight.shape):
                raise HerdError(f"{file}: tensor {key} has shape {list(t.shape)}, the model needs "
                                f"{list(linear.weight.shape)}")
            if matrix == "B" and heads is not None:
                t = hf_to_interleaved(t, heads)
            with torch.no_grad():
                linear.weight.copy_(t)
    extra = sorted(set(tensors) - expected)
    if extra:
        raise HerdError(f"{file}: tensors the config does not target, e.g. {extra[0]} ({len(extra)} in all)")
    return cfg


def load_adapters(model: Transformer, paths: dict[str, str | Path]) -> dict[str, LoraConfig]:
    """Load several adapters onto one base (`herd serve --lora NAME=PATH ...`); afterwards no
    adapter is selected: pick per request or per row with `set_adapters` / `adapters`."""
    configs = {name: load_adapter(model, path, name) for name, path in paths.items()}
    set_adapters(model, None)
    return configs
