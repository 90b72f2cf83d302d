"""LoRA (Hu et al. 2021): a frozen linear layer W plus a low-rank update (alpha / r) * B @ A, with
A [r, in] and B [out, r] (B starts at zero, so training starts from the base model).

One `LoRALinear` can hold several named adapters; `set_adapters` picks which apply: none, one
for the whole batch, or one per batch row (a server answering requests for different adapters
in one batch). `merge_adapter` folds one into the base weights. Adapter files (PEFT's format) are
read and written by herd.checkpoint.peft; training them is herd.train's.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from herd.errors import HerdError
from herd.model.transformer import Transformer

# HF module name -> herd module path inside a block ("" for the classifier).
MODULES = {
    "q_proj": "attention.wq", "k_proj": "attention.wk", "v_proj": "attention.wv", "o_proj": "attention.wo",
    "gate_proj": "feed_forward.w1", "down_proj": "feed_forward.w2", "up_proj": "feed_forward.w3",
    "lm_head": "output",
}
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
    """A frozen base linear layer plus named adapters. The base is an nn.Linear or a quantized
    layer (herd.quant's NF4Linear, which has no `weight` but can `dequantize`)."""

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
        return self.base.weight if hasattr(self.base, "weight") else self.base.dequantize()

    @property
    def device(self) -> torch.device:
        return next(itertools.chain(self.base.parameters(), self.base.buffers())).device


def adapted_layers(model: Transformer, cfg: LoraConfig) -> Iterator[tuple[str, int | None, str]]:
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
    for path, _, _ in adapted_layers(model, cfg):
        parent, _, child = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        layer = getattr(owner, child)
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer)
            setattr(owner, child, layer)
        if name in layer.adapters:
            raise HerdError(f"the model already has an adapter named {name!r}")
        # fp32 whatever the base's dtype: small, and updates this small need the precision
        layer.adapters[name] = Adapter(layer.in_features, layer.out_features, cfg).to(layer.device)
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
        base = layer.base_weight().detach()
        weight = base.float()
        if name in layer.adapters:
            weight = weight + layer.adapters[name].delta()
        dtype = base.dtype
        linear = nn.Linear(layer.in_features, layer.out_features, bias=False, device=weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model
