"""Prefill and decode speed of herd and of Hugging Face transformers, side by side, on random
weights of a named config, with the memory-bandwidth limit of decoding on this machine.

    python benchmarks/decode.py stories110m --threads 2
    python benchmarks/decode.py tinyllama-1.1b --threads 2 --prompt 128 --tokens 64

Decode at batch 1 streams every weight once per token, so (weight bytes / bandwidth) bounds it.
"""

from __future__ import annotations

import argparse
import time

import torch

from herd.bench import bandwidth_gbs
from herd.config import get_config
from herd.generate import SamplingParams, Sequence, run_batch
from herd.model import Transformer


def bench_herd(model: Transformer, prompt: list[int], n_tokens: int) -> tuple[float, float]:
    prefill = []
    for _ in range(3):
        cache = model.new_cache(1, len(prompt) + 1)
        x = torch.tensor([prompt])
        with torch.inference_mode():
            t = time.perf_counter()
            model(x, torch.arange(len(prompt)), cache, logits_at=torch.tensor([len(prompt) - 1]))
            prefill.append(time.perf_counter() - t)
    seq = Sequence(prompt, SamplingParams(max_tokens=n_tokens, temperature=0), None, set(), model.config.vocab_size,
                   limit=n_tokens)
    stamps = [time.perf_counter() for _ in run_batch(model, [seq])]
    return len(prompt) / min(prefill), (len(stamps) - 1) / (stamps[-1] - stamps[0])


def bench_transformers(model: Transformer, prompt: list[int], n_tokens: int) -> tuple[float, float]:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.generation.streamers import BaseStreamer

    c = model.config
    hf = LlamaForCausalLM(LlamaConfig(
        hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, vocab_size=c.vocab_size,
        rms_norm_eps=c.norm_eps, max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings,
        rope_theta=c.rope_theta, attn_implementation="sdpa")).eval()
    x = torch.tensor([prompt])
    prefill = []
    for _ in range(3):
        with torch.inference_mode():
            t = time.perf_counter()
            hf(x, use_cache=True)
            prefill.append(time.perf_counter() - t)

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    stamps = Stamps()
    with torch.inference_mode():
        hf.generate(x, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False, streamer=stamps,
                    pad_token_id=0)
    new = stamps.times[1:]  # the first put is the prompt
    return len(prompt) / min(prefill), (len(new) - 1) / (new[-1] - new[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="registered config name, e.g. stories110m, tinyllama-1.1b")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens for prefill")
    ap.add_argument("--tokens", type=int, default=128, help="tokens to decode")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-transformers", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = get_config(args.config)
    model = Transformer(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt,)).tolist()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = bandwidth_gbs()
    print(f"{cfg.name}: {cfg.num_params() / 1e6:.1f}M params, fp32, {args.threads} threads; "
          f"prompt {args.prompt}, decode {args.tokens}")
    print(f"memory bandwidth (copy) {bw:.1f} GB/s -> decode limit ~{bw * 1e9 / weight_bytes:.1f} tok/s "
          f"({weight_bytes / 1e6:.0f} MB of weights per token)")
    rows = [("herd", *bench_herd(model, prompt, args.tokens))]
    if not args.no_transformers:
        rows.append(("transformers", *bench_transformers(model, prompt, args.tokens)))
    print(f"{'':14s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
    for name, pre, dec in rows:
        print(f"{name:14s} {pre:14.1f} {dec:13.1f}")


if __name__ == "__main__":
    main()
