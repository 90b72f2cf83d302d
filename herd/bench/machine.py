"""What a bench runs on: the CPU's model and the vector instruction sets that herd's kernels and
its peers can use (a figure means little without them: llama.cpp picks AVX-512, VNNI or AMX paths
where the CPU has them)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# the name printed for each instruction set, and Linux's /proc/cpuinfo flag for it
ISA_FLAGS = {"AVX2": "avx2", "FMA": "fma", "AVX-512 F": "avx512f", "AVX-512 BW": "avx512bw",
             "AVX-512 VNNI": "avx512_vnni", "AVX-512 BF16": "avx512_bf16", "AVX-VNNI": "avx_vnni",
             "AMX tile": "amx_tile", "AMX int8": "amx_int8", "AMX bf16": "amx_bf16"}


def cpu(cpuinfo: str | None = None) -> dict:
    """model (name, family and model numbers), logical CPUs, and the set of flags ({} if unknown)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']} model {fields.get('model', '?')})"
    return {"model": name, "cpus": os.cpu_count(), "flags": set(fields.get("flags", "").split())}


def cpu_line(info: dict | None = None) -> str:
    """One line naming the CPU and saying which of ISA_FLAGS it has."""
    info = info or cpu()
    line = f"CPU: {info['model']}, {info['cpus']} logical CPUs"
    if not info["flags"]:
        return line + "; instruction sets unknown (no /proc/cpuinfo)"
    have = [name for name, flag in ISA_FLAGS.items() if flag in info["flags"]]
    lack = [name for name, flag in ISA_FLAGS.items() if flag not in info["flags"]]
    return f"{line}; has {', '.join(have) or 'none'}" + (f"; lacks {', '.join(lack)}" if lack else "")
