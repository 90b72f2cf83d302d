"""Batch-1 greedy decode on a GPU: herd's eager step, its static step replayed as a CUDA graph (plain
and with torch.compile), and transformers' `generate`, beside the HBM limit (weight bytes / the
bandwidth of a device copy). Random weights: decode speed does not depend on the values.

    python benchmarks/decode_static.py --shapes llama-3.2-1b,llama-3.1-8b --out results.json

Writes the results as they come (JSON), so a run cut short still reports what it measured. Also
checks, on small fp32 configs, that the recorded step gives the eager forward's greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch
import torch._inductor.config

from herd.bench import bandwidth_gbs, streamed_bytes, transformers_config
from herd.config import ModelConfig, get_config
from herd.generate.static import StaticDecoder, greedy
from herd.model import Transformer


def random_model(cfg: ModelConfig, dtype: torch.dtype, device: str) -> Transformer:
    """The model with N(0, 0.02) weights made on the device (no CPU copy, tied weights kept tied)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    state = {k: torch.empty(v.shape, dtype=dtype, device=device).normal_(0, 0.02)
             for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "output.weight")}
    if cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, assign=True)
    model.inv_freq = model.inv_freq.to(device)
    return model.eval().requires_grad_(False)


def timed(fn, sync) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


@torch.inference_mode()
def eager_decode(model: Transformer, prompt: torch.Tensor, tokens: int, sync) -> float:
    """tok/s of herd's eager step (as `LLM.stream` drives it): one forward per token."""
    n = prompt.shape[1]
    cache = model.new_cache(1, n + tokens + 2)
    token = model(prompt, torch.arange(n, device=prompt.device), cache)[:, -1:].argmax(-1)
    model(token, torch.tensor([n], device=prompt.device), cache)  # warm-up

    def run():
        nonlocal token
        for i in range(tokens):
            token = model(token, torch.tensor([n + 1 + i], device=prompt.device), cache)[:, -1].argmax(-1, keepdim=True)
    return tokens / timed(run, sync)


def static_decode(model: Transformer, prompts: list[list[int]], tokens: int, sync, compile: bool) -> dict:
    """tok/s over all rows of the static step, replayed as a CUDA graph on CUDA."""
    decoder = StaticDecoder(model, len(prompts), max(map(len, prompts)) + tokens + 2, compile=compile)
    decoder.prefill(prompts)
    t = time.perf_counter()
    decoder.step()  # records the graph (and compiles)
    sync()
    record = time.perf_counter() - t
    seconds = timed(lambda: [decoder.step() for _ in range(tokens)], sync)
    return {"tok_s": len(prompts) * tokens / seconds, "record_s": record}


def transformers_decode(cfg: ModelConfig, prompt: torch.Tensor, tokens: int, dtype, sync) -> float:
    from transformers import LlamaForCausalLM

    with torch.device(prompt.device):
        hf = LlamaForCausalLM(transformers_config(cfg)).to(dtype).eval()
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        hf.generate(prompt, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        short = timed(lambda: hf.generate(prompt, max_new_tokens=2, min_new_tokens=2, **kw), sync)
        long = timed(lambda: hf.generate(prompt, max_new_tokens=tokens + 2, min_new_tokens=tokens + 2, **kw), sync)
    del hf
    return tokens / (long - short)  # the difference leaves out prefill


def check_exact(device: str) -> dict:
    """Recorded static steps against the eager forward's greedy tokens on small fp32 configs."""
    out = {}
    for name, cfg in {"llama2": ModelConfig(256, 4, 8, 1000, 512, max_seq_len=256),
                      "llama3": ModelConfig(256, 4, 8, 1000, 512, n_kv_heads=2, rope_theta=5e5,
                                            tie_embeddings=True, max_seq_len=256)}.items():
        torch.manual_seed(0)
        model = Transformer(cfg).to(device).eval()
        prompts = [torch.randint(0, 1000, (n,)).tolist() for n in (7, 19, 3)]
        got = greedy(model, prompts, 32)
        want = []
        with torch.inference_mode():
            for p in prompts:
                ids = list(p)
                for _ in range(32):
                    ids.append(int(model(torch.tensor([ids], device=device))[0, -1].argmax()))
                want.append(ids[len(p):])
        out[name] = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w)) / (32 * len(prompts))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="llama-3.2-1b,llama-3.1-8b")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=0, help="also the graph step over this many rows at once")
    p.add_argument("--tune", action="store_true", help="compile with coordinate-descent tuning of the kernels")
    p.add_argument("--skip", default="", help="comma-separated: exact, eager, graph, compiled, transformers")
    p.add_argument("--out", default="decode_static.json")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    results: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}

    def record(key, fn):
        try:
            results[key] = fn()
        except Exception:
            results[key] = {"error": traceback.format_exc(limit=3)}
        print(key, json.dumps(results[key]), flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    if cuda:
        record("copy_GBps", lambda: bandwidth_gbs(1 << 32, 10, args.device))
    skip = set(args.skip.split(","))
    if args.tune:
        torch._inductor.config.coordinate_descent_tuning = True
    if "exact" not in skip:
        record("exact_fraction", lambda: check_exact(args.device))
    dtype = torch.bfloat16 if cuda else torch.float32
    for shape in args.shapes.split(","):
        cfg = get_config(shape)
        model = random_model(cfg, dtype, args.device)
        prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt), device=args.device)
        record(f"{shape}/weight_GB", lambda: streamed_bytes(model) / 1e9)
        if "eager" not in skip:
            record(f"{shape}/eager", lambda: eager_decode(model, prompt, min(args.tokens, 32), sync))
        if "graph" not in skip:
            record(f"{shape}/graph", lambda: static_decode(model, prompt.tolist(), args.tokens, sync, False))
        if args.batch:
            rows = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt)).tolist()
            record(f"{shape}/graph_b{args.batch}", lambda: static_decode(model, rows, args.tokens, sync, False))
        if "compiled" not in skip:
            record(f"{shape}/compiled", lambda: static_decode(model, prompt.tolist(), args.tokens, sync, True))
        del model
        if "transformers" not in skip:
            record(f"{shape}/transformers", lambda: transformers_decode(cfg, prompt, min(args.tokens, 32), dtype, sync))
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
