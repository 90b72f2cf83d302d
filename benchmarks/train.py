"""Training speed of herd and of Hugging Face transformers, side by side: the same shapes, random
weights, the same batch, the same loss (next-token cross-entropy in fp32) and optimizer (fused
AdamW), one full step (forward, backward, optimizer) at a time. herd runs as its trainer does
(the loss fused with the classifier; with --compile, also its compiled blocks), transformers as
its users would (logits, then cross_entropy; with --compile, also the model compiled whole).
Prints tokens/s, MFU and the compile times.

    python benchmarks/train.py stories15m --batch 8 --seq-len 256 --threads 2 [--compile]
    python benchmarks/train.py smollm2-135m --batch 4 --seq-len 256 --vocab 8192

MFU (model FLOPs utilisation) = achieved model FLOP/s / the machine's peak. Model FLOPs per token
are 6 x (parameters of every matrix multiply, the classifier included, the embedding lookup not)
+ 12 x layers x dim x seq_len for attention (PaLM's formula, forward and backward). Peak is the
best of a large fp32 matrix multiply on this machine with the same threads (achievable peak);
the theoretical peak of AVX2 FMA (32 FLOP per cycle per core) is printed beside it.

The contenders run in alternating rounds and each keeps its best round, so a noisy neighbour
slows all alike.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from herd.config import get_config
from herd.model import Transformer
from herd.train.config import TrainConfig
from herd.train.objectives import LanguageModeling
from herd.train.recipes import init_weights
from herd.train.trainer import compile_blocks, optimizer_for


def hf_model(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size,
        rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
        rope_theta=cfg.rope_theta, attn_implementation="sdpa"))


def model_flops_per_token(cfg, seq_len: int) -> float:
    d, f, hd = cfg.dim, cfg.hidden_dim, cfg.head_dim
    per_layer = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2 + 3 * d * f
    matmul_params = cfg.n_layers * per_layer + cfg.vocab_size * d
    return 6 * matmul_params + 12 * cfg.n_layers * d * seq_len


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def theoretical_peak() -> float | None:
    """Cores x 32 FP32 FLOP/cycle (two 256-bit FMA units) x clock, when the CPU has AVX2 + FMA."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return None
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    if " avx2" not in flags or " fma" not in flags or not mhz:
        return None
    return torch.get_num_threads() * 32 * max(mhz) * 1e6


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default="stories15m", help="registered shape (see `herd info list`)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, help="override the vocabulary size")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps per round")
    p.add_argument("--compile", action="store_true", help="also time herd --compile and transformers compiled")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = get_config(args.config)
    if args.vocab:
        cfg = cfg.replace(vocab_size=args.vocab)
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, args.seq_len))
    train_cfg = TrainConfig(out="-", lr=1e-4, weight_decay=0.0, compile=args.compile)
    objective = LanguageModeling()
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1))
    batch = {"tokens": x[:, :-1], "targets": x[:, 1:]}

    def herd_step(compiled: bool):
        """As herd's trainer runs a step (objective, optimizer_for, --compile)."""
        model = init_weights(Transformer(cfg), seed=0)  # as `herd pretrain` starts
        if compiled:
            compile_blocks(model, torch.device("cpu"))
        opt = optimizer_for(model, train_cfg)

        def step():
            objective(model, batch)["loss"].div(batch["targets"].numel()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def hf_step(compiled: bool):
        """As a transformers user would: the model's logits, cross_entropy, fused AdamW (the Trainer's
        default optimizer with torch >= 2.8); compiled whole with `model.compile()`."""
        model = hf_model(cfg).train()
        if compiled:
            model.compile()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True)

        def step():
            logits = model(input_ids=batch["tokens"]).logits
            F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    steps = {"herd": herd_step(False), "transformers": hf_step(False)}
    if args.compile:
        steps |= {"herd --compile": herd_step(True), "transformers compiled": hf_step(True)}
    first = {name: _timed(fn) for name, fn in steps.items()}  # warm up: allocations, optimizer state, compiling
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(args.rounds):  # alternating, so a noisy neighbour slows every contender alike
        for name, fn in steps.items():
            best[name] = min(best[name], _timed(lambda: [fn() for _ in range(args.steps)]) / args.steps)

    tokens = args.batch * args.seq_len
    flops = model_flops_per_token(cfg, args.seq_len)
    peak = matmul_peak()
    theory = theoretical_peak()
    params = sum(p.numel() for p in Transformer(cfg).parameters())
    print(f"{args.config}: {params / 1e6:.1f}M parameters, vocab {cfg.vocab_size}, batch {args.batch} x "
          f"{args.seq_len} tokens, fp32, {args.threads} threads, torch {torch.__version__}")
    print(f"peak: fp32 matmul {peak / 1e9:.0f} GFLOP/s measured"
          + (f", {theory / 1e9:.0f} GFLOP/s theoretical (AVX2 FMA)" if theory else ""))
    for name, dt in best.items():
        achieved = flops * tokens / dt
        mfu = f"MFU {achieved / peak:.0%} of measured peak" + (f", {achieved / theory:.0%} of theoretical" if theory else "")
        print(f"{name:22s} {tokens / dt:6.0f} tokens/s  {dt * 1e3:6.0f} ms/step  {achieved / 1e9:5.1f} GFLOP/s  {mfu}")
    for name in steps:
        if "compile" in name:
            print(f"{name}: compiling took {first[name] - best[name]:.0f} s (first step minus a step)")
    ours = "herd --compile" if args.compile else "herd"
    print(f"{ours} / transformers: {best['transformers'] / best[ours]:.2f}x")
    if args.compile:
        print(f"herd / transformers: {best['transformers'] / best['herd']:.2f}x (both eager); herd --compile / "
              f"transformers compiled: {best['transformers compiled'] / best[ours]:.2f}x")

if __name__ == "__main__":
    main()
