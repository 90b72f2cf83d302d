"""`herd bench`: prefill and decode speed of a model in each weight format, its peak memory, and how
close decoding comes to the machine's limit, side by side with transformers and llama.cpp.

Decoding one token streams every weight once, so (weight bytes per token / memory bandwidth) bounds
decode speed; the bench measures the bandwidth itself and reports decode as a fraction of that
bound. Each format runs in its own process, so each peak RSS is that format's alone.
"""

from __future__ import annotations

import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import torch

from herd.config import ModelConfig, get_config
from herd.bench.machine import cpu_line
from herd.bench.peers import llama_bench, llama_cpp_binary, transformers_kwargs, transformers_row
from herd.errors import HerdError
from herd.info import checkpoint_path
from herd.model import Transformer
from herd.quant import quantize
from herd.quant.forward import enable

FORMATS = ("f32", "f16", "bf16", "int8", "int4")
# llama.cpp's type for each format: what herd's format matches bit for bit (int8 in groups of 32 is
# Q8_0, symmetric int4 in groups of 32 is Q4_0)
GGUF_TYPES = {"f32": "f32", "f16": "f16", "bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}


def bandwidth_gbs(nbytes: int = 1 << 29, repeats: int = 5, device: str = "cpu") -> float:
    """Memory bandwidth in GB/s as bytes read + written by a large tensor copy on `device` (best
    of a few)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if src.is_cuda else (lambda: None)
    best = float("inf")
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


def random_model(config: str, fmt: str, seed: int = 0):
    """A model of the registered config `config` with random weights, in `fmt`."""
    torch.manual_seed(seed)
    model = Transformer(get_config(config)).eval().requires_grad_(False)
    if fmt in ("f16", "bf16"):
        quantize(model.to(torch.float16 if fmt == "f16" else torch.bfloat16), 16)
    elif fmt == "int8":
        quantize(model, 8, 32)
    elif fmt == "int4":
        quantize(model, 4, 32, symmetric=True)
    return enable(model)


def checkpoint_model(path: str, fmt: str):
    """The checkpoint at `path` in `fmt` ("stored": GGUF quants kept as they are)."""
    from herd.checkpoint import load_model  # not at the top: 15 MB of RSS a random-weights row would count

    dtype = {"f16": torch.float16, "bf16": torch.bfloat16}.get(fmt, torch.float32)
    quantize_to = {"stored": "keep", "int8": "int8", "int4": "int4"}.get(fmt)
    return load_model(path, dtype, quantize_to=quantize_to, group_size=32 if fmt == "int8" else None,
                      tokenizer=False)[0]


def streamed_bytes(model) -> int:
    """Bytes of weights read per decoded token: all but the embedding table, of which one row is
    read (a tied embedding is counted as the output matrix)."""
    return sum(t.numel() * t.element_size() for name, t in model.state_dict().items()
               if not name.startswith("tok_embeddings."))


@torch.inference_mode()
def measure(model, prompt: int, tokens: int) -> dict:
    """Prefill tok/s (best of 3) and decode tok/s (greedy, batch 1, after a warm-up step)."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt))
    best = float("inf")
    for _ in range(3):
        cache = model.new_cache(1, prompt + tokens + 1)
        t = time.perf_counter()
        logits = model(ids, torch.arange(prompt), cache, logits_at=torch.tensor([prompt - 1]))
        best = min(best, time.perf_counter() - t)
    token = logits[:, -1].argmax(-1, keepdim=True)
    model(token, torch.tensor([prompt]), cache)  # warm-up
    t = time.perf_counter()
    for i in range(tokens):
        token = model(token, torch.tensor([prompt + 1 + i]), cache)[:, -1].argmax(-1, keepdim=True)
    return {"prefill": prompt / best, "decode": tokens / (time.perf_counter() - t)}


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _herd_row(source: str, fmt: str, prompt: int, tokens: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    model = checkpoint_model(source, fmt) if Path(source).exists() else random_model(source, fmt)
    row = measure(model, prompt, tokens)
    return dict(row, bytes=streamed_bytes(model), rss=_peak_rss_mb(), build=herd_build())


def herd_build() -> str:
    """herd's version, torch's, and which code computes packed weights."""
    from herd import __version__
    from herd.quant import native

    kernels = "C kernels" if native.library() is not None else "torch code (no C kernels)"
    return f"herd {__version__}, torch {torch.__version__}, {kernels}"


def transformers_config(c: ModelConfig):
    """transformers' LlamaConfig of the same shape as `c` (for speed: rope scaling is left out)."""
    from transformers import LlamaConfig  # optional, and seconds to import

    return LlamaConfig(**transformers_kwargs(c))


def _gguf_vocab(vocab_size: int) -> dict:
    """A placeholder SentencePiece vocabulary, so that llama.cpp loads a random-weight GGUF."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"t{i}" for i in range(vocab_size - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (vocab_size - 259)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0] * vocab_size, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}


def _llama_cpp_row(source: str, fmt: str, prompt: int, tokens: int, threads: int, tmp: Path) -> dict:
    """llama-bench on the same weights, written to GGUF by herd."""
    from herd.checkpoint import convert  # as in checkpoint_model
    from herd.checkpoint.gguf_writer import save_gguf

    out = tmp / f"{fmt}.gguf"
    if Path(source).exists():
        convert(source, out, "gguf", gguf_type=GGUF_TYPES[fmt])
    else:
        model = random_model(source, "f32")
        save_gguf(model.config, model.state_dict(), out, GGUF_TYPES[fmt], tokenizer=_gguf_vocab(model.config.vocab_size))
        del model
    try:
        return llama_bench(out, prompt, tokens, threads)
    finally:
        out.unlink()


def in_child(fn, *args):
    """fn(*args) in a fresh process (its own peak RSS, no memory left behind)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def bench(source: str, formats: list[str], prompt: int = 128, tokens: int = 64, threads: int = 2,
          transformers: bool = True, llama_cpp: bool = True) -> list[dict]:
    """One row per (engine, format): engine, format, prefill and decode tok/s, peak RSS (MB), and
    for herd the bytes streamed per token and decode / the bandwidth bound. `source` is a registered
    config name (random weights), a checkpoint path or a model in the store."""
    path = checkpoint_path(source)
    random = path is None
    source = source if random else str(path)
    for fmt in formats:
        if fmt not in FORMATS + ("stored",) or (fmt == "stored" and random):
            raise HerdError(f"unknown format {fmt!r}; use {', '.join(FORMATS)}" + ("" if random else " or stored"))
    if prompt < 1 or tokens < 2:
        raise HerdError("--prompt must be at least 1 and --tokens at least 2")
    torch.set_num_threads(threads)
    bw = bandwidth_gbs()
    rows = []
    has_llama_cpp = llama_cpp and llama_cpp_binary("llama-bench") is not None
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in formats:
            row = in_child(_herd_row, source, fmt, prompt, tokens, threads)
            row.update(engine="herd", format=fmt, bound=bw * 1e9 / row["bytes"])
            rows.append(row)
            if transformers and random and fmt in ("f32", "f16", "bf16"):
                dtype = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[fmt]
                rows.append(dict(transformers_row(get_config(source), dtype, prompt, tokens, threads),
                                 engine="transformers", format=fmt))
            if has_llama_cpp and fmt == "stored" and source.endswith(".gguf"):  # the very same file
                rows.append(dict(llama_bench(Path(source), prompt, tokens, threads), engine="llama.cpp", format=fmt))
            elif has_llama_cpp and fmt != "stored":
                rows.append(dict(_llama_cpp_row(source, fmt, prompt, tokens, threads, Path(tmp)),
                                 engine="llama.cpp", format=GGUF_TYPES[fmt]))
    return [dict(r, bandwidth=bw) for r in rows]


def report(rows: list[dict]) -> str:
    """The machine (CPU, bandwidth), the rows as a table with decode as a fraction of the bandwidth
    bound, herd's speed over llama.cpp's on the same weights, and each engine's build."""
    lines = [cpu_line(), f"memory bandwidth (copy, measured): {rows[0]['bandwidth']:.1f} GB/s",
             f"{'engine':13s} {'format':7s} {'prefill tok/s':>13s} {'decode tok/s':>12s} {'MB/token':>9s} "
             f"{'of limit':>8s} {'peak RSS MB':>11s}"]
    for r in rows:
        mb = f"{r['bytes'] / 1e6:9.0f}" if "bytes" in r else f"{'':9s}"
        frac = f"{r['decode'] / r['bound']:8.2f}" if "bound" in r else f"{'':8s}"
        rss = f"{r['rss']:11.0f}" if "rss" in r else f"{'':11s}"
        lines.append(f"{r['engine']:13s} {r['format']:7s} {r['prefill']:13.1f} {r['decode']:12.1f} {mb} {frac} {rss}")
    peer = {r["format"]: r for r in rows if r["engine"] == "llama.cpp"}
    for r in rows:
        p = peer.get(GGUF_TYPES.get(r["format"], r["format"])) if r["engine"] == "herd" else None
        if p is not None:
            lines.append(f"herd / llama.cpp, {r['format']}: prefill {r['prefill'] / p['prefill']:.2f}x, "
                         f"decode {r['decode'] / p['decode']:.2f}x")
    builds = {r["engine"]: r["build"] for r in rows if "build" in r}
    return "\n".join(lines + [f"{engine}: {build}" for engine, build in builds.items()])
