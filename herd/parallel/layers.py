"""Megatron-style tensor-parallel layers, and `shard`, which turns a Transformer (built on the meta
device) into rank k's slice of it.

Every rank holds whole attention heads: wq/wk/wv and w1/w3 keep their rows for the rank's heads
and hidden units (split by output, no communication), wo and w2 keep the matching columns (split by
input) and their partial products are summed by one all-reduce. The embedding and the output head
split the vocabulary: each rank looks up the tokens it holds (zeros elsewhere, then an
all-reduce) and computes the logits of its rows (then an all-gather). Norms, the rotary table and
Llama 4's router are replicated. So a dense layer costs two all-reduces of [tokens, dim].

Llama 4's experts are split either within each expert (every rank holds 1/N of every expert's
hidden units; "within") or across experts (every rank holds 1/N of the experts whole; "across").
Either way the routed and shared experts' partial sums meet in one all-reduce per layer. Across
is the default: on a 2-core EPYC it prefilled 1.6-2x faster at 2 ranks (each rank runs fewer
experts on more tokens each) and decoded as fast (benchmarks/tp.py --moe).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from herd.config import ModelConfig
from herd.errors import HerdError
from herd.model.moe import Experts, MoE
from herd.model.transformer import FeedForward, Transformer

EXPERT_SPLITS = ("within", "across")
_compute_group: list = [None]  # the process group of the layers' collectives (set by runtime.start)


def set_compute_group(group) -> None:
    _compute_group[0] = group


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x, group=_compute_group[0])
    return x


def check_shardable(cfg: ModelConfig, world: int, experts: str = "across") -> None:
    """Refuse a split that would cut a head, a KV head or a layer's width unevenly: before any
    weight is read, so that the error costs nothing."""
    if experts not in EXPERT_SPLITS:
        raise HerdError(f"unknown expert split {experts!r}; use {' or '.join(EXPERT_SPLITS)}")
    if cfg.n_kv_heads < world:
        raise HerdError(f"tensor parallel size {world} is more than the model's {cfg.n_kv_heads} KV heads "
                        "(each rank needs whole KV heads; herd does not replicate them)")
    widths = {"attention heads": cfg.n_heads, "KV heads": cfg.n_kv_heads, "feed-forward width": cfg.hidden_dim}
    if cfg.moe is not None:
        widths["experts" if experts == "across" else "expert width"] = \
            cfg.moe.n_experts if experts == "across" else cfg.moe.hidden_dim
    for what, n in widths.items():
        if n % world:
            raise HerdError(f"tensor parallel size {world} does not divide the model's {n} {what}")


class RowParallelLinear(nn.Linear):
    """A linear layer holding a slice of the inputs: its output is a partial sum, all-reduced."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(super().forward(x))


class VocabParallelEmbedding(nn.Module):
    """Rows [rank * per, (rank + 1) * per) of the embedding (the last rank's padded with zeros)."""

    def __init__(self, vocab_size: int, dim: int, rank: int, world: int):
        super().__init__()
        self.per = -(-vocab_size // world)
        self.start = rank * self.per
        self.weight = nn.Parameter(torch.empty(self.per, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        outside = (local < 0) | (local >= self.per)
        x = F.embedding(local.clamp(0, self.per - 1), self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return all_reduce(x)


class VocabParallelHead(nn.Module):
    """The output head's rows for the rank's slice of the vocabulary; every rank gets all logits."""

    def __init__(self, vocab_size: int, dim: int, world: int):
        super().__init__()
        self.vocab_size, self.world = vocab_size, world
        self.weight = nn.Parameter(torch.empty(-(-vocab_size // world), dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = F.linear(x, self.weight).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local, group=_compute_group[0])
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]


class ParallelMoE(MoE):
    """Routed and shared experts each give a partial sum; one all-reduce adds them up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(super().forward(x))


class ExpertShard(Experts):
    """Experts [first, first + n) whole; assignments to other ranks' experts are skipped."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int, first: int):
        super().__init__(n_experts, dim, hidden_dim)
        self.first = first

    def forward(self, x: torch.Tensor, experts: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        local = experts - self.first
        mine = (local >= 0) & (local < self.w1.shape[0])
        token, slot = mine.nonzero(as_tuple=True)
        out = torch.zeros_like(x)
        if token.numel():
            picked = super().forward(x[token], local[token, slot].unsqueeze(1), scores[token, slot].unsqueeze(1))
            out.index_add_(0, token, picked)
        return out


def _split_ffn(ff: FeedForward, world: int, reduce: bool) -> None:
    hidden = ff.w1.out_features // world
    dim = ff.w1.in_features
    ff.w1, ff.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
    ff.w2 = (RowParallelLinear if reduce else nn.Linear)(hidden, dim, bias=False)


def _split_moe(cfg: ModelConfig, rank: int, world: int, experts: str) -> ParallelMoE:
    shared = FeedForward(cfg.dim, cfg.moe.hidden_dim)
    _split_ffn(shared, world, reduce=False)  # summed with the routed experts by ParallelMoE's all-reduce
    moe = ParallelMoE(cfg.dim, cfg.moe, shared_expert=shared)
    m = cfg.moe
    if experts == "within":
        moe.experts = Experts(m.n_experts, cfg.dim, m.hidden_dim // world)
    else:
        per = m.n_experts // world
        moe.experts = ExpertShard(per, cfg.dim, m.hidden_dim, rank * per)
    return moe


def shard(model: Transformer, rank: int, world: int, experts: str = "across") -> None:
    """Make `model` (on the meta device, weights not yet given) rank `rank`'s slice of itself."""
    cfg = model.config
    check_shardable(cfg, world, experts)
    for block in model.layers:
        a = block.attention
        a.n_heads, a.n_kv_heads = cfg.n_heads // world, cfg.n_kv_heads // world
        a.wq = nn.Linear(cfg.dim, a.n_heads * cfg.head_dim, bias=False)
        a.wk = nn.Linear(cfg.dim, a.n_kv_heads * cfg.head_dim, bias=False)
        a.wv = nn.Linear(cfg.dim, a.n_kv_heads * cfg.head_dim, bias=False)
        a.wo = RowParallelLinear(a.n_heads * cfg.head_dim, cfg.dim, bias=False)
        if isinstance(block.feed_forward, MoE):
            block.feed_forward = _split_moe(cfg, rank, world, experts)
        else:
            _split_ffn(block.feed_forward, world, reduce=True)
    model.tok_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.dim, rank, world)
    model.output = VocabParallelHead(cfg.vocab_size, cfg.dim, world)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
