"""`herd bench --kernels`: what each C kernel reaches, in GFLOP/s and GB/s, beside the machine's
measured peaks: the copy bandwidth, and the multiply-add rate of each instruction set the CPU has
(peak.c, built here). Decode (one token, herd_linear) streams each weight once, so on a matrix set
larger than the cache it is measured against the bandwidth; on a cache-resident matrix and in
prefill (herd_matmul) it is bound by arithmetic, measured against the peaks.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import torch

from herd.bench import bandwidth_gbs, in_child
from herd.bench.machine import cpu, cpu_line
from herd.errors import HerdError
from herd.quant import pack_weight
from herd.quant.native import cache_dir

# name: (function in peak.c, CPU flags it needs, operations per iteration: chains x lanes x 2)
PEAKS = {"fp32 FMA, AVX2": ("herd_peak_fma256", {"avx2", "fma"}, 12 * 8 * 2),
         "fp32 FMA, AVX-512": ("herd_peak_fma512", {"avx512f"}, 12 * 16 * 2),
         "int8 maddubs+madd, AVX2": ("herd_peak_int8_avx2", {"avx2"}, 12 * 32 * 2),
         "int8 VNNI, 256-bit": ("herd_peak_vnni256", {"avx512f", "avx512vl", "avx512_vnni"}, 12 * 32 * 2),
         "int8 VNNI, 512-bit": ("herd_peak_vnni512", {"avx512f", "avx512_vnni"}, 12 * 64 * 2)}
# weight formats: (pack_weight's format, group size, symmetric) and GGUF's name for the same blocks
FORMATS = {"f32": ("f32", None, False), "f16": ("f16", None, False), "bf16": ("bf16", None, False),
           "q8_0": ("q8", 32, False), "q4_0": ("q4", 32, True), "q4_1": ("q4", 32, False)}
# (what, out x in features, tokens): TinyLlama's FFN, streamed from memory or multiplied by a prompt;
# SmolLM2's, which stays in the cache
SHAPES = [("decode, streamed", 5632, 2048, 1), ("decode, in cache", 1536, 576, 1), ("prefill", 5632, 2048, 128)]


def peak_library() -> ctypes.CDLL:
    """peak.c, compiled once per source text into herd's kernel cache."""
    source = Path(__file__).with_name("peak.c")
    cc = next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)
    if cc is None:
        raise HerdError("herd bench --kernels needs a C compiler (set CC)")
    path = cache_dir() / f"herd_peak_{hashlib.sha256(source.read_bytes()).hexdigest()[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        result = subprocess.run([cc, "-O3", "-shared", "-fPIC", "-std=c11", str(source), "-o", str(tmp)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise HerdError(f"cannot build peak.c: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
        os.replace(tmp, path)
    return ctypes.CDLL(str(path))


def peaks(threads: int, iters: int = 20_000_000) -> dict[str, float]:
    """G operations/s of each of PEAKS the CPU has, on `threads` threads at once (best of 3)."""
    lib, flags, out = peak_library(), cpu()["flags"], {}
    for name, (fn, needs, ops) in PEAKS.items():
        if not needs <= flags:
            continue
        f = getattr(lib, fn)
        f.argtypes, f.restype = [ctypes.c_int64], ctypes.c_float
        best = float("inf")
        for _ in range(3):
            workers = [threading.Thread(target=f, args=(iters,)) for _ in range(threads)]  # ctypes drops the GIL
            t = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            best = min(best, time.perf_counter() - t)
        out[name] = threads * iters * ops / best / 1e9
    return out


def _layers(fmt: str, n: int, k: int, total_bytes: int) -> list:
    """Enough distinct packed n x k matrices in `fmt` to make up `total_bytes` (at least one)."""
    packed_as, group, symmetric = FORMATS[fmt]
    first = pack_weight(torch.randn(n, k), packed_as, group, symmetric)
    size = sum(t.numel() * t.element_size() for t in first.packed().values())
    return [first] + [pack_weight(torch.randn(n, k), packed_as, group, symmetric)
                      for _ in range(max(0, total_bytes // size - 1))]


@torch.inference_mode()
def kernel_row(fmt: str, what: str, n: int, k: int, tokens: int, stream_bytes: int, seconds: float = 1.0) -> dict:
    """GFLOP/s and GB/s of weights read by one format's kernel on one shape (the best pass over its
    matrices; a streamed shape cycles through more matrices than the cache holds)."""
    layers = _layers(fmt, n, k, stream_bytes if what.endswith("streamed") else 0)
    x = torch.randn(1, tokens, k)
    size = sum(t.numel() * t.element_size() for t in layers[0].packed().values())
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        t = time.perf_counter()
        for layer in layers:
            layer(x)
        best = min(best, (time.perf_counter() - t) / len(layers))
    return {"format": fmt, "what": what, "shape": f"{n}x{k}", "tokens": tokens,
            "gflops": 2 * n * k * tokens / best / 1e9, "gbs": size / best / 1e9, "bytes": size, "matrices": len(layers)}


def _isa_rows(isa: str | None, threads: int, stream_bytes: int, seconds: float, shapes: list) -> list[dict]:
    """Every format on every shape with the kernels of `isa` (HERD_ISA; None: herd's own choice)."""
    if isa:
        os.environ["HERD_ISA"] = isa  # read when the kernel library is first loaded, below
    torch.set_num_threads(threads)
    return [dict(kernel_row(fmt, what, n, k, tokens, stream_bytes, seconds), isa=isa or "default")
            for what, n, k, tokens in shapes for fmt in FORMATS]


def kernel_bench(threads: int = 2, isas: list[str | None] | None = None, stream_bytes: int = 256 << 20,
                 seconds: float = 1.0, shapes: list = SHAPES) -> dict:
    """The machine's peaks and every kernel's rows (each timed for `seconds`), each ISA in a fresh
    process; streamed shapes cycle through `stream_bytes` of matrices."""
    torch.set_num_threads(threads)
    rows = [row for isa in (isas or [None])
            for row in in_child(_isa_rows, isa, threads, stream_bytes, seconds, shapes)]
    return {"bandwidth": bandwidth_gbs(), "peaks": peaks(threads), "threads": threads, "rows": rows}


def _against(row: dict, result: dict) -> str:
    """The row as a fraction of the limit that binds it: bandwidth, or the best fp32 or int8 peak."""
    if row["what"].endswith("streamed"):
        return f"{row['gbs'] / result['bandwidth']:.2f} of bandwidth"
    kind = "int8" if row["what"].startswith("decode") and row["format"].startswith("q") else "fp32"
    name, peak = max(((n, p) for n, p in result["peaks"].items() if n.startswith(kind)), key=lambda np: np[1],
                     default=(None, 0.0))
    return f"{row['gflops'] / peak:.2f} of {name}" if name else ""


def kernel_report(result: dict) -> str:
    lines = [cpu_line(), f"memory bandwidth (copy, measured): {result['bandwidth']:.1f} GB/s",
             f"peaks (measured, {result['threads']} threads, G operations/s): "
             + "; ".join(f"{name} {value:.0f}" for name, value in result["peaks"].items()),
             f"{'HERD_ISA':9s} {'format':6s} {'kernel':17s} {'shape':>10s} {'tokens':>6s} {'GFLOP/s':>8s} "
             f"{'GB/s':>6s}  of the limit"]
    for r in result["rows"]:
        lines.append(f"{r['isa']:9s} {r['format']:6s} {r['what']:17s} {r['shape']:>10s} {r['tokens']:6d} "
                     f"{r['gflops']:8.1f} {r['gbs']:6.1f}  {_against(r, result)}")
    return "\n".join(lines)
