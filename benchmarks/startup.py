"""How long `herd` takes from launch to its first output: the first token of `herd generate`, and
an error. Each command runs as a user runs it (a fresh process), in turns with every checkout
given, so that a busy machine slows them alike; prints the median and best of each.

    python benchmarks/startup.py --runs 5 [--checkout OLD_CHECKOUT ...]

The model store is $HERD_HOME (the default model must have been pulled: `herd pull`). Wall time
is to the first byte on standard output (the first token), or to the exit for an error; CPU time
(user + system) is the whole process's.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "first token, default model": ["generate", "-t", "0", "-n", "1", "Hi"],
    "first token, --quantize keep": ["generate", "-t", "0", "-n", "1", "--quantize", "keep", "Hi"],
    "error: missing file": ["generate", "-m", "/no/such/model.gguf", "Hi"],
    "error: unknown model": ["generate", "-m", "no-such-model", "Hi"],
    "error: bad flag": ["generate", "--temperature", "-1", "Hi"],
}


def run_once(checkout: Path, args: list[str]) -> tuple[float, float, int]:
    """(seconds to the first output byte or the exit, CPU seconds, exit code) of one `herd` run."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "herd", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env, cwd=checkout)
    first = proc.stdout.read(1)
    seen = time.perf_counter() - start
    proc.stdout.read()
    code = proc.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return (seen if first else time.perf_counter() - start), cpu, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--checkout", action="append", default=[], help="another herd checkout to time beside this one")
    parser.add_argument("--only", help="run only the commands whose label contains this")
    args = parser.parse_args()
    checkouts = [Path(__file__).resolve().parents[1], *map(Path, args.checkout)]
    for label, command in COMMANDS.items():
        if args.only and args.only not in label:
            continue
        times: dict[Path, list[tuple[float, float, int]]] = {c: [] for c in checkouts}
        for c in checkouts:
            run_once(c, command)  # warm the page cache and any built kernels
        for _ in range(args.runs):
            for c in checkouts:
                times[c].append(run_once(c, command))
        for c in checkouts:
            walls, cpus, codes = zip(*times[c])
            print(f"{label:32s} {str(c):40s} wall median {statistics.median(walls):5.2f} s, best {min(walls):5.2f} s;"
                  f" CPU median {statistics.median(cpus):5.2f} s (exit {set(codes)})", flush=True)


if __name__ == "__main__":
    main()
