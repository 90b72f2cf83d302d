"""Small helpers shared by test modules."""

import math

import torch


@torch.no_grad()
def spread_init(model: torch.nn.Module) -> torch.nn.Module:
    """Weights scaled so attention is far from uniform and logits spread over several units: a
    wrong rotary layout or a swapped tensor then moves logits by far more than test tolerances."""
    for p in model.parameters():
        if p.dim() == 2:
            p.normal_(0, 1 / math.sqrt(p.shape[1]))
        else:
            p.uniform_(0.5, 1.5)
    return model
