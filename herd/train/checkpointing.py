"""Training checkpoints that survive a crash at any moment.

A checkpoint is a directory `checkpoints/step-NNNNNNNN/` holding
  state/         model and optimizer, written by torch.distributed.checkpoint (each process its
                 shards), so a run saved by N processes resumes on M
  rng/rank-R.pt  each process's random generator states
  trainer.json   step, tokens seen, the data it was trained on
  export/        the model as a loadable checkpoint (HF directory, or a PEFT adapter)
It is written under a hidden temporary name and renamed into place only when complete (a
rename is atomic), so a killed run leaves either a whole checkpoint or none; the newest `keep`
stay.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from herd.errors import HerdError
from herd.train.distributed import Dist, barrier

_NAME = re.compile(r"step-(\d{8})")


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _NAME.fullmatch(p.name) and (p / "trainer.json").is_file())


def _options(trainable_only: bool, full: bool = False) -> StateDictOptions:
    # strict=False with frozen tensors left out; DCP still fails on any tensor the checkpoint lacks
    return StateDictOptions(ignore_frozen_params=trainable_only, full_state_dict=full, cpu_offload=full,
                            strict=not trainable_only)


def _trainable(model: nn.Module, sd: dict[str, torch.Tensor], trainable_only: bool) -> dict[str, torch.Tensor]:
    """Without frozen buffers either (an NF4 base's codes): the base is rebuilt from its own file."""
    if not trainable_only:
        return sd
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in sd.items() if k in names}


def full_state_dict(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The whole (unsharded) model state on the CPU of rank 0 (a collective under FSDP)."""
    return _trainable(model, get_model_state_dict(model, options=_options(trainable_only, full=True)), trainable_only)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer: dict,
         export: Callable[[Path, dict[str, torch.Tensor]], None], trainable_only: bool, keep: int, d: Dist) -> Path:
    """Write checkpoint `step` atomically (every process calls this) and prune old ones."""
    root = run_dir / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        (tmp / "rng").mkdir(parents=True)
    barrier(d)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(trainable_only))
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": _trainable(model, model_sd, trainable_only), "optim": optim_sd}, checkpoint_id=tmp / "state")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng" / f"rank-{d.rank:05d}.pt")
    full = full_state_dict(model, trainable_only)
    barrier(d)
    if d.main:
        export(tmp / "export", full)
        (tmp / "trainer.json").write_text(json.dumps({**trainer, "step": step, "world": d.world}, indent=2) + "\n")
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)  # a re-run of the same step
        os.rename(tmp, final)
        _fsync_dir(root)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    barrier(d)
    return final


def load(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool, d: Dist) -> None:
    """Restore model, optimizer and random state from checkpoint `ckpt` (resharding as needed)."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(trainable_only))
    state = {"model": _trainable(model, model_sd, trainable_only), "optim": optim_sd}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=ckpt / "state")
    except Exception as e:  # DCP raises CheckpointException with every rank's traceback
        first = str(e).strip().splitlines()
        raise HerdError(f"{ckpt}: cannot restore the training state ({first[-1] if first else type(e).__name__}); "
                        "was it written by a run of the same model and method?") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(trainable_only))
    files = sorted((ckpt / "rng").glob("rank-*.pt"))
    rng = torch.load(files[d.rank % len(files)], weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def trainer_state(ckpt: Path) -> dict:
    """Checkpoint `ckpt`'s trainer.json: step, units seen, elapsed time, the data trained on."""
    return json.loads((ckpt / "trainer.json").read_text())
