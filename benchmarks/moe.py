"""Speed of herd's grouped expert dispatch against transformers' Llama 4 MoE layer (which runs
every expert on every token, scaled by a router score of zero for the unchosen ones), on one
layer of random weights, fp32.

    python benchmarks/moe.py --dim 1024 --hidden 2048 --experts 16 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from herd.config import MoE as MoEConfig
from herd.model.moe import MoE
from herd.model.transformer import FeedForward


def best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    hf = Llama4TextMoe(Llama4TextConfig(hidden_size=args.dim, intermediate_size=args.hidden,
                                        num_local_experts=args.experts, num_experts_per_tok=args.top_k)).eval()
    cfg = MoEConfig(n_experts=args.experts, hidden_dim=args.hidden, top_k=args.top_k)
    ours = MoE(args.dim, cfg, FeedForward(args.dim, args.hidden)).eval()
    with torch.no_grad():  # random weights (a bare transformers module is not initialised), the same in both
        for w in hf.parameters():
            w.normal_(0, w.shape[-2] ** -0.5 if w.dim() == 3 else w.shape[1] ** -0.5)
        ours.router.weight.copy_(hf.router.weight)
        gate, up = hf.experts.gate_up_proj.chunk(2, dim=-1)
        ours.experts.w1.copy_(gate), ours.experts.w3.copy_(up), ours.experts.w2.copy_(hf.experts.down_proj)
        ours.shared_expert.w1.weight.copy_(hf.shared_expert.gate_proj.weight)
        ours.shared_expert.w3.weight.copy_(hf.shared_expert.up_proj.weight)
        ours.shared_expert.w2.weight.copy_(hf.shared_expert.down_proj.weight)
    print(f"MoE layer: dim {args.dim}, expert hidden {args.hidden}, {args.experts} experts, top-{args.top_k}, "
          f"{args.threads} threads, fp32")
    print(f"{'tokens':>7} {'herd ms':>9} {'transformers ms':>16} {'speed-up':>9} {'max |diff|':>11}")
    with torch.inference_mode():
        for tokens in (1, 16, 128):
            x = torch.randn(1, tokens, args.dim)
            diff = float((ours(x) - hf(x)[0].view_as(x)).abs().max())
            t_ours = best_time(lambda: ours(x), args.repeats)
            t_hf = best_time(lambda: hf(x), args.repeats)
            print(f"{tokens:>7} {t_ours * 1e3:>9.2f} {t_hf * 1e3:>16.2f} {t_hf / t_ours:>8.1f}x {diff:>11.2e}")


if __name__ == "__main__":
    main()
