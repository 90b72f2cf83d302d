"""Tensor parallelism on the CPU: decode and prefill tokens/s of one model at TP 1 (one process)
and TP N (N processes on gloo), one thread per rank, beside the cost of the collectives one decode
step makes (2 all-reduces of [1, dim] per layer, 1 for the embedding, 1 all-gather of the logits),
timed alone on the same group. Random weights saved as HF safetensors: speed does not depend on
the values. Llama 4 experts are timed split within experts and across them.

    python benchmarks/tp.py --shape stories110m --tp 2 --out tp.json

TP 1 runs the same torch layers as the ranks (herd's native decode step is off), so the ratio is
what the split itself gains or costs.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from herd import parallel
from herd.checkpoint import save_hf
from herd.checkpoint.load import load_model
from herd.config import get_config
from herd.model import Transformer


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def speeds(model, prompt: int, steps: int, repeats: int) -> dict:
    """Prefill tokens/s of a `prompt`-token prompt and decode tokens/s of `steps` steps after it."""
    tokens = torch.randint(0, model.config.vocab_size, (1, prompt))
    cache = model.new_cache(1, prompt + steps + 1)

    def prefill():
        model(tokens, cache=cache, logits_at=torch.tensor([prompt - 1]))

    def decode():
        for i in range(steps):
            model(tokens[:, :1], torch.tensor([[prompt + i]]), cache)

    return {"prefill_tok_s": prompt / timed(prefill, repeats), "decode_tok_s": steps / timed(decode, repeats)}


def _collectives(rank: int, world: int, port: int, dim: int, vocab: int, layers: int, tokens: int,
                 repeats: int, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x, logits = torch.zeros(1, tokens, dim), torch.zeros(1, 1, -(-vocab // world))
    parts = [torch.empty_like(logits) for _ in range(world)]

    def step():  # what one forward over `tokens` tokens sends (logits of the last token only)
        for _ in range(2 * layers + 1):
            dist.all_reduce(x)
        dist.all_gather(parts, logits)

    dist.barrier()
    seconds = timed(step, repeats)
    if rank == 0:
        out.put(seconds)
    dist.destroy_process_group()


def collectives_per_step(cfg, world: int, tokens: int, repeats: int = 50) -> float:
    """Seconds the collectives of one forward over `tokens` tokens take on `world` gloo ranks of
    one thread, timed alone (no compute between them)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    args = (world, port, cfg.dim, cfg.vocab_size, cfg.n_layers, tokens, repeats, out)
    procs = [ctx.Process(target=_collectives, args=(r, *args)) for r in range(world)]
    for p in procs:
        p.start()
    seconds = out.get(timeout=600)
    for p in procs:
        p.join()
    return seconds


def save_random(cfg, path: Path, moe: bool) -> None:
    """Random weights of `cfg` as an HF directory; with `moe`, a Llama 4 of its shape with 8 experts
    (top 1) of half its feed-forward width in every layer, written by transformers (herd's writers
    lay out Llama 1-3 only)."""
    if not moe:
        save_hf(cfg, Transformer(cfg).state_dict(), path)
        return
    import transformers

    hf = transformers.Llama4TextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim // 2,
        intermediate_size_mlp=cfg.hidden_dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, num_local_experts=8, num_experts_per_tok=1,
        interleave_moe_layer_step=1, no_rope_layer_interval=4, max_position_embeddings=cfg.max_seq_len)
    transformers.Llama4ForCausalLM(hf).save_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="stories110m")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--moe", action="store_true", help="give every layer 8 experts (top 1), Llama 4 style")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    cfg = get_config(args.shape).replace(max_seq_len=args.prompt + args.steps + 8)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        save_random(cfg, path, args.moe)
        torch.set_num_threads(1)
        one, _ = load_model(path, torch.float32)
        cfg = one.config
        results = {"shape": args.shape + (" + 8 experts" if args.moe else ""), "params": cfg.num_params(), "tp": {}}
        one.fast_forward = None
        results["tp"]["1"] = speeds(one, args.prompt, args.steps, args.repeats)
        del one
        print(json.dumps(results), flush=True)
        torch.set_num_threads(args.tp)  # start() gives each rank threads // tp: one
        for split in parallel.EXPERT_SPLITS if args.moe else ["within"]:
            model, _ = parallel.load(path, args.tp, torch.float32, experts=split)
            key = str(args.tp) + (f" ({split})" if args.moe else "")
            results["tp"][key] = speeds(model, args.prompt, args.steps, args.repeats)
            del model
            print(json.dumps(results), flush=True)
        parallel.stop()
    results["collectives_ms"] = {"decode_step": 1e3 * collectives_per_step(cfg, args.tp, 1),
                                 "prefill": 1e3 * collectives_per_step(cfg, args.tp, args.prompt, 10)}
    print(json.dumps(results), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
