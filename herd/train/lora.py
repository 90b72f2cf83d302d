"""LoRA (Hu et al. 2021): a frozen linear layer W plus a trainable low-rank update
(alpha / r) * B @ A, with A [r, in] and B [out, r] (B starts at zero, so training starts from
the base model).

Adapters are saved and loaded in PEFT's format (`adapter_config.json` +
`adapter_model.safetensors`, Hugging Face module names), so an adapter trained here loads with
`peft` onto transformers' LlamaForCausalLM and the other way round. herd's wq/wk rows are in
Meta's interleaved rotary order and HF's are in rotate-half order, so the rows of B for q_proj
and k_proj are permuted on save and load (A acts on the input side, which is not permuted).

One `LoRALinear` can hold several named adapters; `set_adapters` picks which apply: none, one
for the whole batch, or one per batch row (a server answering requests for different adapters
in one batch).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from herd.checkpoint.hf import hf_to_interleaved, interleaved_to_hf
from herd.config import ModelConfig
from herd.errors import HerdError
from herd.model import Transformer
from herd.quant.nf4 import NF4Linear

# HF module name -> herd module path inside a block ("" for the classifier).
MODULES = {
    "q_proj": "attention.wq", "k_proj": "attention.wk", "v_proj": "attention.wv", "o_proj": "attention.wo",
    "gate_proj": "feed_forward.w1", "down_proj": "feed_forward.w2", "up_proj": "feed_forward.w3",
    "lm_head": "output",
}
_HF_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
              "gate_proj": "mlp", "down_proj": "mlp", "up_proj": "mlp"}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    """r: rank; alpha: the update is scaled by alpha / r (alpha / sqrt(r) with rslora);
    targets: HF module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj,
    lm_head) or herd's (wq, ..., w3, output); layers: the blocks to adapt (None: all)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Sequence[str] = ALL_LINEAR
    layers: Sequence[int] | None = None
    rslora: bool = False
    base_model: str = ""
    extra: dict = field(default_factory=dict)  # other adapter_config.json fields, kept on save

    def __post_init__(self) -> None:
        herd_names = {path.rpartition(".")[2]: hf for hf, path in MODULES.items()}
        targets = [herd_names.get(t, t) for t in self.targets]
        unknown = [t for t in targets if t not in MODULES]
        if unknown:
            raise HerdError(f"LoRA targets {unknown} are not linear layers of a Llama; use {', '.join(MODULES)}")
        if not targets:
            raise HerdError("LoRA needs at least one target module")
        if not isinstance(self.r, int) or self.r <= 0:
            raise HerdError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0 <= self.dropout < 1:
            raise HerdError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        self.targets = tuple(dict.fromkeys(targets))
        self.layers = None if self.layers is None else tuple(sorted(set(self.layers)))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class Adapter(nn.Module):
    def __init__(self, in_features: int, out_features: int, cfg: LoraConfig):
        super().__init__()
        self.A = nn.Linear(in_features, cfg.r, bias=False)
        self.B = nn.Linear(cfg.r, out_features, bias=False)
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))  # as nn.Linear and PEFT initialise A
        nn.init.zeros_(self.B.weight)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.scale = cfg.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.B(self.A(self.dropout(x.to(self.A.weight.dtype)))) * self.scale).to(x.dtype)

    def delta(self) -> torch.Tensor:
        """The update this adapter adds to the base weight."""
        return (self.B.weight.float() @ self.A.weight.float()) * self.scale


class LoRALinear(nn.Module):
    """A frozen base linear layer (nn.Linear or NF4Linear) plus named adapters."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.selection: str | list[str | None] | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        sel = self.selection
        if sel is None:
            return out
        if isinstance(sel, str):
            return out + self.adapters[sel](x)
        if len(sel) != x.shape[0]:
            raise ValueError(f"{len(sel)} per-row adapters for a batch of {x.shape[0]} rows")
        for name in dict.fromkeys(s for s in sel if s is not None):
            rows = torch.tensor([i for i, s in enumerate(sel) if s == name], device=x.device)
            out = out.index_add(0, rows, self.adapters[name](x.index_select(0, rows)).to(out.dtype))
        return out

    def base_weight(self) -> torch.Tensor:
        return self.base.dequantize() if isinstance(self.base, NF4Linear) else self.base.weight


def _modules(model: Transformer, cfg: LoraConfig) -> Iterator[tuple[str, int | None, str]]:
    """(herd module path, layer or None, HF name) of every layer the config adapts."""
    n_layers = model.config.n_layers
    layers = range(n_layers) if cfg.layers is None else cfg.layers
    for i in layers:
        if not 0 <= i < n_layers:
            raise HerdError(f"LoRA layer {i} does not exist in a {n_layers}-layer model")
    for hf in cfg.targets:
        if hf == "lm_head":
            yield "output", None, hf
        else:
            for i in layers:
                yield f"layers.{i}.{MODULES[hf]}", i, hf


def add_adapter(model: Transformer, cfg: LoraConfig, name: str = "default") -> Transformer:
    """Give `model` a new adapter `name` on the layers `cfg` targets, freeze every base
    parameter and select the adapter. In place; returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    for path, _, _ in _modules(model, cfg):
        parent, _, child = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        layer = getattr(owner, child)
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer)
            setattr(owner, child, layer)
        if name in layer.adapters:
            raise HerdError(f"the model already has an adapter named {name!r}")
        device = next(layer.base.buffers()).device if isinstance(layer.base, NF4Linear) else layer.base.weight.device
        # fp32 whatever the base's dtype: small, and updates this small need the precision
        layer.adapters[name] = Adapter(layer.in_features, layer.out_features, cfg).to(device)
    set_adapters(model, name)
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for path, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield path, m


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def set_adapters(model: nn.Module, selection: str | Sequence[str | None] | None) -> None:
    """Which adapters apply from now on: None (the base model), a name (every row), or one
    name or None per batch row of the next forward passes."""
    known = adapter_names(model)
    wanted = [selection] if isinstance(selection, str) else list(selection or [])
    unknown = sorted({s for s in wanted if s is not None and s not in known})
    if unknown:
        raise HerdError(f"no adapter named {', '.join(unknown)}; the model has {', '.join(known) or 'none'}")
    value = selection if selection is None or isinstance(selection, str) else list(selection)
    for _, layer in lora_layers(model):
        layer.selection = value


@contextmanager
def adapters(model: nn.Module, selection: str | Sequence[str | None] | None):
    """`set_adapters` for the duration of a with-block, then back to what was selected."""
    before = [(layer, layer.selection) for _, layer in lora_layers(model)]
    set_adapters(model, selection)
    try:
        yield model
    finally:
        for layer, sel in before:
            layer.selection = sel


def merge_adapter(model: Transformer, name: str = "default") -> Transformer:
    """Fold adapter `name` into the base weights and drop every adapter, leaving a plain
    Transformer (an NF4 base is dequantized to fp32 first). In place; returns the model."""
    if name not in adapter_names(model):
        raise HerdError(f"no adapter named {name!r} to merge")
    if model.config.tie_embeddings and isinstance(model.output, LoRALinear):
        raise HerdError("cannot merge an lm_head adapter into a model whose classifier is tied to its embedding")
    for path, layer in list(lora_layers(model)):
        weight = layer.base_weight().detach().float()
        if name in layer.adapters:
            weight = weight + layer.adapters[name].delta()
        dtype = torch.float32 if isinstance(layer.base, NF4Linear) else layer.base.weight.dtype
        linear = nn.Linear(layer.in_features, layer.out_features, bias=False, device=weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model


# ---- PEFT format ----

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
    for path, layer, hf in _modules(model, cfg):
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
    for mod_path, layer_idx, hf in _modules(model, cfg):
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
