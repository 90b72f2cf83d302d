"""What a training run is told: `TrainConfig`, and recipe files (YAML or TOML) that fill it."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from herd.errors import HerdError

PRECISIONS = ("auto", "fp32", "bf16")
PARALLEL = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """out: the run directory. batch_size is per process and micro-step: one optimizer step sees
    batch_size x grad_accum x processes sequences (or preference pairs). lr warms up linearly
    for `warmup` steps, then follows a cosine down to min_lr at `steps`. eval_every/save_every
    0 means only at the end; `keep` is how many checkpoints stay on disk. compile: torch.compile
    each transformer block (fused elementwise kernels; the first step pays for compiling)."""

    out: str
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "auto"
    activation_checkpointing: bool = False
    compile: bool = False
    eval_every: int = 0
    eval_batches: int = 8
    save_every: int = 0
    keep: int = 2
    log_every: int = 10
    seed: int = 1337
    parallel: str = "ddp"
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        problems = []
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_batches", "keep", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup", "eval_every", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                problems.append(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                problems.append(f"{name} must be a non-negative number, got {value!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.parallel not in PARALLEL:
            problems.append(f"parallel must be one of {', '.join(PARALLEL)}, got {self.parallel!r}")
        if problems:
            raise HerdError("; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_recipe(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML (.yaml/.yml) or TOML (.toml) file, or JSON: a flat mapping of option
    names (as on the command line, `-` or `_`) to values."""
    import yaml  # here, not at the top: 40 ms that every `herd` command would spend at start

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise HerdError(f"{path}: cannot read recipe ({e.strerror})") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
        raise HerdError(f"{path}: invalid recipe ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or any(isinstance(v, dict) for v in data.values()):
        raise HerdError(f"{path}: a recipe is a flat mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
