"""Summed next-token cross-entropy of the classifier head, fused with the head.

The plain way (logits = head(x); F.cross_entropy(logits)) keeps [tokens, vocab] fp32 logits for
backward and makes several more tensors of that size (log-softmax, its gradient, the loss
gradient): with Llama's 32000-128256 words they outweigh the rest of the model's activations
and, on the CPU, cost as much time in memory traffic and fresh-page faults as in arithmetic.
Here the head runs over row chunks into one reused buffer, and each chunk's gradients (of x and
of the head's weight) are computed while its logits are at hand, so backward only scales them
by the incoming gradient. Same matrix multiplies, same result up to fp32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_ELEMENTS = 2**24  # logits per chunk: 64 MiB of fp32


def cross_entropy_sum(x: torch.Tensor, head: nn.Module, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Sum over positions of -log softmax(head(x))[target], skipping targets equal to ignore_index.
    x [..., dim], targets [...]. Fused for a plain fp32 nn.Linear without autocast; any other head
    (LoRA, NF4, bf16 weights) takes the plain way, and so does a model being compiled
    (torch.compile traces it and fuses it its own way). Not marked @torch.compiler.disable: that
    imports torch._dynamo, 1.3 s of every `herd` command's start."""
    x, targets = x.flatten(0, -2), targets.flatten()
    weight = getattr(head, "weight", None)
    if (type(head) is nn.Linear and head.bias is None and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled(x.device.type) and not torch.compiler.is_compiling()):
        return _LinearCrossEntropy.apply(x, weight, targets, ignore_index, torch.is_grad_enabled())
    return F.cross_entropy(head(x).float(), targets, ignore_index=ignore_index, reduction="sum")


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, grad: bool):
        want_x, want_w = (grad and need for need in ctx.needs_input_grad[:2])
        keep = targets != ignore_index
        rows = x if bool(keep.all()) else x[keep]
        targets = targets[keep] if rows is not x else targets
        n, vocab = rows.shape[0], weight.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_rows = torch.empty_like(rows) if want_x else None
        grad_w = None if not want_w else torch.empty_like(weight) if n else torch.zeros_like(weight)
        chunk = max(1, min(n, CHUNK_ELEMENTS // vocab))
        buf = x.new_empty(chunk, vocab)
        for start in range(0, n, chunk):
            xc, tc = rows[start : start + chunk], targets[start : start + chunk]
            logp = buf[: len(xc)]
            torch.mm(xc, weight.t(), out=logp)
            torch.log_softmax(logp, -1, out=logp)
            picked = logp.gather(1, tc.unsqueeze(1))
            loss -= picked.sum()
            if not (want_x or want_w):
                continue
            # d loss / d logits = softmax - one_hot(target). The clamp keeps exp's results normal
            # floats (>= 1.8e-35; below e^-87 MKL's exp is ~40x slower), a change far below rounding.
            grad = logp.clamp_(min=-80.0).exp_()
            grad.scatter_(1, tc.unsqueeze(1), picked.exp_().sub_(1))
            if want_x:
                torch.mm(grad, weight, out=grad_rows[start : start + chunk])
            if want_w and start == 0:
                torch.mm(grad.t(), xc, out=grad_w)
            elif want_w:
                grad_w.addmm_(grad.t(), xc)
        if want_x and rows is not x:
            grad_rows = x.new_zeros(x.shape).index_put_((keep,), grad_rows)
        ctx.grads = (grad_rows, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError("the fused cross-entropy cannot run backward twice (retain_graph)")
        grad_x, grad_w = ctx.grads  # made for this one backward: scaled in place, then dropped
        ctx.grads = None
        scale = lambda g: None if g is None else g.mul_(grad_loss)  # noqa: E731
        return scale(grad_x), scale(grad_w), None, None, None
