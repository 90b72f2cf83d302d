"""Tensor-parallel inference over torch.distributed: sharded layers, per-rank loading, and the
processes that run them (see runtime.py)."""

from herd.parallel.layers import EXPERT_SPLITS, check_shardable
from herd.parallel.model import ShardedTransformer
from herd.parallel.runtime import load, start, stop

__all__ = ["EXPERT_SPLITS", "ShardedTransformer", "check_shardable", "load", "start", "stop"]
