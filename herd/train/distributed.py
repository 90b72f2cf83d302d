"""One trainer, many processes: `torchrun` starts copies of the same command, each learns its
rank from the environment, and the model is wrapped in DDP (replicated, gradients all-reduced)
or FSDP2 (`fully_shard`: parameters, gradients and optimizer state sharded per block). gloo on
the CPU, NCCL on CUDA."""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from herd.errors import HerdError
from herd.llm import check_device
from herd.train.config import PARALLEL


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str = "cpu") -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR);
    a plain single process when not launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = check_device(device)
    if world == 1:
        return Dist(device=dev)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, parallel: str, d: Dist) -> nn.Module:
    """The module to call in the training loop: the model itself on one process, a DDP wrapper,
    or the model sharded in place by FSDP2 (each transformer block is one unit)."""
    if d.world == 1:
        return model
    if parallel == "ddp":
        return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard  # only under fsdp

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    raise HerdError(f"unknown parallelism {parallel!r}; use one of {', '.join(PARALLEL)}")


def sync_gradients(wrapped: nn.Module, enabled: bool):
    """Context for one micro-step of gradient accumulation: only the last one all-reduces."""
    if isinstance(wrapped, DistributedDataParallel):
        return nullcontext() if enabled else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(enabled)
    return nullcontext()


def all_sum(values: list[float], d: Dist) -> list[float]:
    """Element-wise sum over all processes."""
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()
