"""herd's C kernels (the sources in `csrc/`, described in `csrc/kernels.h`): built with the system C
compiler on first use, cached, and called through ctypes.

Building at run time needs nothing but a C compiler (the same one torch.compile needs). Without
one, `library()` returns None and the packed layers fall back to plain torch (correct, slower);
`HERD_NO_KERNELS=1` forces that.

One library per instruction set (`ISAS`: plain C, AVX2, AVX-512 with VNNI), each built from the
same sources with its own flags; `library()` loads the best one this CPU runs (asked of cpuid by a
probe built without vector flags), or the one `HERD_ISA` names, refusing one the CPU lacks.
`HERD_DEBUG=1` says which was chosen. Every one computes the integer kernels' results bit for bit
alike (tests/test_isa.py).

The structs passed to C are declared here again as ctypes Structures (`STRUCTS`); the library
reports its own layout of them (`herd_layout`) and `load` refuses a library that disagrees.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from functools import cache
from pathlib import Path

import torch

from herd.errors import HerdError

SOURCES = Path(__file__).with_name("csrc")

_P, _I, _T = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
FORMAT_CODES = {"f32": 0, "f16": 1, "bf16": 2, "q8": 3, "q4": 4}


class Linear(ctypes.Structure):
    """A weight matrix: format, fp16 scales or not, group size, shape, pointers."""

    _fields_ = [("fmt", ctypes.c_int), ("s16", ctypes.c_int), ("g", _I), ("N", _I), ("K", _I),
                ("w", _P), ("s", _P), ("m", _P)]


class Layer(ctypes.Structure):
    """A transformer block for herd_forward: its norms' weights and its seven linear layers."""

    _fields_ = [("attn_norm", _P), ("ffn_norm", _P)] + [(n, Linear) for n in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")]


class Model(ctypes.Structure):
    """The model for herd_forward: its shape, its blocks (an array of Layer), final norm and output layer."""

    _fields_ = [(n, _I) for n in ("dim", "hidden", "n_layers", "n_heads", "n_kv_heads", "head_dim")] + [
        ("eps", ctypes.c_float), ("layers", _P), ("norm", _P), ("output", Linear)]


class Step(ctypes.Structure):
    """One call of herd_forward: the model, the tokens' embeddings and positions, the KV cache, the logits."""

    _fields_ = [("model", _P), ("B", _I), ("T", _I), ("x", _P), ("pos", _P), ("cos", _P), ("sin", _P), ("rows", _P),
                ("k_cache", _P), ("v_cache", _P), ("cache_rows", _I), ("cache_len", _I), ("logits_at", _P),
                ("logits", _P), ("threads", ctypes.c_int)]


STRUCTS = {cls.__name__: cls for cls in (Linear, Layer, Model, Step)}


class _LayoutLine(ctypes.Structure):
    """One line of `herd_layout`'s table (kernels.h's LayoutLine)."""

    _fields_ = [("type", ctypes.c_char_p), ("field", ctypes.c_char_p), ("offset", _I), ("size", _I)]


_SIGNATURES = {
    "herd_linear": ([_P, _P, _I, _P, _T], None),
    "herd_matmul": ([_P, _P, _I, _P, _T], None),
    "herd_forward": ([_P], None),
    "herd_layout": ([], ctypes.POINTER(_LayoutLine)),
    "herd_cpu_has": ([_T], _T),
}


def cache_dir() -> Path:
    home = os.environ.get("HERD_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "herd") / "kernels"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


ISAS = ("generic", "avx2", "avx512")  # worst to best; the numbers of csrc/isa.c are their indices
_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
_ISA_FLAGS = {"generic": ["-DHERD_GENERIC"], "avx2": _AVX2,
              "avx512": _AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]}
# tuning (and, for generic, the CPU's own instructions for what the compiler vectorizes by itself)
# and OpenMP are optional: the first set that builds wins
_TUNE = {"generic": "-march=native", "avx2": "-mtune=native", "avx512": "-mtune=native"}


def _flag_sets(isa: str) -> list[list[str]]:
    flags = _ISA_FLAGS[isa]
    return [flags + [_TUNE[isa], "-fopenmp"], flags + [_TUNE[isa]], flags + ["-fopenmp"], flags]


def _build(cc: str, out: Path, tries: list[list[str]], sources: list[Path] | None = None) -> str | None:
    """Compile `sources` (default: all of csrc/*.c) to `out`; the first flag set that works wins.
    Returns the compiler's complaint when nothing worked."""
    sources = [str(p) for p in (sources or sorted(SOURCES.glob("*.c")))]
    # -ffp-contract=off: a * b + c is fused only where the code says fma (clang would fuse on its own)
    base = [cc, "-O3", "-fPIC", "-shared", "-std=c11", "-D_GNU_SOURCE", "-fvisibility=hidden", "-ffp-contract=off",
            *sources, "-lm"]
    error = ""
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        for flags in tries:
            lib = Path(tmp) / out.name
            result = subprocess.run(base[:1] + flags + base[1:] + ["-o", str(lib)], capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(lib, out)  # atomic: concurrent builders never see a half-written library
                return None
            error = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
    return error


def _built(cc: str, name: str, tries: list[list[str]], sources: list[Path] | None = None) -> tuple[Path, str | None]:
    """The cached library `name` (keyed by the sources, compiler and machine), built if missing:
    (its path, None) or (its path, the compiler's complaint)."""
    key = hashlib.sha256(_source_text() + f"{cc}|{platform.machine()}|{platform.node()}|{name}".encode()).hexdigest()[:16]
    path = cache_dir() / f"herd_{name}_{key}{'.dll' if sys.platform == 'win32' else '.so'}"
    if path.exists():
        return path, None
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, _build(cc, path, tries, sources)


@cache
def cpu_isas() -> tuple[str, ...]:
    """The instruction sets of ISAS this CPU runs, worst to best (generic only without a compiler)."""
    cc = _compiler()
    path, error = _built(cc, "probe", [[]], [SOURCES / "isa.c"]) if cc else (None, "no compiler")
    if error is not None:
        return ("generic",)
    has = ctypes.CDLL(str(path)).herd_cpu_has
    return tuple(isa for code, isa in enumerate(ISAS) if has(code))


def chosen_isa() -> str:
    """HERD_ISA if set (refused unless this CPU runs it), else the best instruction set it runs."""
    have, forced = cpu_isas(), os.environ.get("HERD_ISA")
    if not forced:
        return have[-1]
    if forced in have:
        return forced
    why = ("herd has no AMX kernels" if forced == "amx" else "this CPU lacks it" if forced in ISAS
           else f"unknown instruction set (herd's: {', '.join(ISAS)})")
    raise HerdError(f"HERD_ISA={forced}: {why}; this CPU runs {', '.join(have)}")


def library(isa: str | None = None) -> ctypes.CDLL | None:
    """The loaded kernel library for `isa` (default: chosen_isa()), building it if needed; None when
    kernels are off or cannot be built."""
    if os.environ.get("HERD_NO_KERNELS"):
        return None
    return _library(isa or chosen_isa())


@cache
def _library(isa: str) -> ctypes.CDLL | None:
    cc = _compiler()
    if cc is None:
        warnings.warn("herd: no C compiler found (set CC); using slower torch code for packed weights", stacklevel=3)
        return None
    path, error = _built(cc, f"kernels_{isa}", _flag_sets(isa))
    if error is not None:
        warnings.warn(f"herd: cannot build the C kernels ({error}); using slower torch code", stacklevel=3)
        return None
    if os.environ.get("HERD_DEBUG"):
        print(f"herd: kernels for {isa} ({path}); this CPU runs {', '.join(cpu_isas())}"
              + (" (HERD_ISA)" if os.environ.get("HERD_ISA") else ""), file=sys.stderr)
    return load(path)


def _source_text() -> bytes:
    """Every source file's name and text: what a built library is cached under."""
    files = sorted(p for p in SOURCES.rglob("*") if p.suffix in (".c", ".h"))
    return b"".join(str(p.relative_to(SOURCES)).encode() + b"\0" + p.read_bytes() for p in files)


def load(path: Path) -> ctypes.CDLL:
    """A built kernel library, its entry points typed and its structs' layout checked."""
    lib = ctypes.CDLL(str(path))
    for name, (argtypes, restype) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    check_layout(lib)
    return lib


def check_layout(lib: ctypes.CDLL, structs: dict[str, type[ctypes.Structure]] = STRUCTS) -> None:
    """Raise RuntimeError unless C lays out each of `structs` as its ctypes Structure does: the same
    size, and each field at the same offset with the same size (a mismatch would pass C garbage)."""
    table = lib.herd_layout()
    lines = itertools.takewhile(lambda line: line.type is not None, (table[i] for i in itertools.count()))
    c_side = {(line.type.decode(), line.field and line.field.decode()): (line.offset, line.size) for line in lines}
    for name, cls in structs.items():
        py_side = {(name, None): (0, ctypes.sizeof(cls))}
        py_side |= {(name, f): (getattr(cls, f).offset, getattr(cls, f).size) for f, *_ in cls._fields_}
        for key in sorted(py_side.keys() | {k for k in c_side if k[0] == name}, key=str):
            if py_side.get(key) != c_side.get(key):
                what = ".".join(k for k in key if k)
                raise RuntimeError(f"herd's C kernels and herd/quant/native.py disagree on {what}: (offset, size) "
                                   f"{c_side.get(key, 'missing')} in C, {py_side.get(key, 'missing')} in Python")


def threads() -> int:
    return torch.get_num_threads()
