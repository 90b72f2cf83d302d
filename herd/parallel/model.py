"""One rank's slice of a Transformer: the layers of herd.parallel.layers, a KV cache of the rank's
KV heads, and on rank 0 a `mirror` that repeats every cache and forward call on the other ranks
before computing its own part, so that code written for one process (the decode loop, the
serving engine, speculative decoding) drives all of them unchanged."""

from __future__ import annotations

import torch

from herd.config import ModelConfig
from herd.errors import HerdError
from herd.model.kv_cache import KVCache
from herd.model.transformer import Transformer
from herd.parallel.layers import shard


class ShardedTransformer(Transformer):
    """Rank `rank` of `world` of a model of config `cfg` (build it on the meta device, then load
    the rank's weights). `config` stays the whole model's; the layers hold the rank's slices."""

    def __init__(self, cfg: ModelConfig, rank: int, world: int, experts: str = "across"):
        super().__init__(cfg)
        shard(self, rank, world, experts)
        self.rank, self.world, self.experts = rank, world, experts
        self.mirror = None  # rank 0: runtime.Leader, which sends each call to the other ranks first
        self.tp_id = 0  # the id the ranks know this model by
        self.load_report: list[dict] = []  # per rank: bytes read from storage and peak RSS while loading

    def new_cache(self, batch_size: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None,
                  kind: type[KVCache] = KVCache) -> KVCache:
        """The rank's part of a KV cache: its own KV heads only."""
        cfg = self.config
        cache = kind(cfg.n_layers, batch_size, cfg.n_kv_heads // self.world, max_seq_len or cfg.max_seq_len,
                     cfg.head_dim, dtype=dtype or self.dtype, device=self.device)
        if self.mirror is not None:
            self.mirror.new_cache(self, cache)
        return cache

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, cache=None,
                logits_at: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, static: bool = False) -> torch.Tensor:
        """Transformer.forward over all ranks; training inputs and static (CUDA graph) steps are not
        supported across processes."""
        if doc_ids is not None or targets is not None or static:
            raise HerdError("tensor parallelism runs inference only: no doc_ids, targets or static steps")
        if self.mirror is None:
            return super().forward(tokens, input_pos, cache, logits_at)
        with self.mirror.lock:  # the other ranks must see the calls in the order rank 0 computes them
            self.mirror.forward(self, tokens, input_pos, cache, logits_at)
            return super().forward(tokens, input_pos, cache, logits_at)
