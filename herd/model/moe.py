"""Llama 4's mixture-of-experts feed-forward: a sigmoid top-k router, routed SwiGLU experts and a
shared expert that sees every token.

Dispatch is grouped: the (token, expert) assignments are sorted by expert, and each expert runs
one matrix product over all of its tokens, so the Python loop is over experts, never tokens, and
an expert no token chose costs nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import MoE as MoEConfig


class Experts(nn.Module):
    """SwiGLU experts stacked along dim 0, stored for `x @ w`: w1 (gate) and w3 (up) are
    [experts, dim, hidden], w2 (down) is [experts, hidden, dim]."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        for w in (self.w1, self.w2, self.w3):
            nn.init.normal_(w, std=w.shape[1] ** -0.5)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """x [N, dim]; experts, scores [N, k]: each token's chosen experts and router scores.
        Returns the sum over each token's experts of expert(score * token)."""
        k = experts.shape[1]
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        token = order // k
        counts = torch.bincount(flat, minlength=self.w1.shape[0]).tolist()
        routed = x[token] * scores.flatten()[order].unsqueeze(1)  # Llama 4 scales the input, not the output
        out = torch.empty_like(routed)
        start = 0
        for e, n in enumerate(counts):
            if n:
                h = routed[start:start + n]
                out[start:start + n] = (F.silu(h @ self.w1[e]) * (h @ self.w3[e])) @ self.w2[e]
                start += n
        unsorted = torch.empty_like(out)
        unsorted[order] = out  # back to (token, k) order; index_add_ would be far slower on the CPU
        return unsorted.view(-1, k, x.shape[1]).sum(1)


class MoE(nn.Module):
    def __init__(self, dim: int, cfg: MoEConfig, shared_expert: nn.Module):
        super().__init__()
        self.top_k = cfg.top_k
        self.router = nn.Linear(dim, cfg.n_experts, bias=False)
        self.experts = Experts(cfg.n_experts, dim, cfg.hidden_dim)
        self.shared_expert = shared_expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits, experts = self.router(flat).topk(self.top_k, dim=-1)
        scores = torch.sigmoid(logits.float()).to(flat.dtype)
        return (self.shared_expert(flat) + self.experts(flat, experts, scores)).view(x.shape)
