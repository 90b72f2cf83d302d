"""The peers herd is measured against, llama.cpp's llama-bench and transformers, each run as a
child process in the environment the user gave herd (`herd.threads.peer_environment`), never in
the one herd tuned for its own threads; each reports its build beside its figures."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from herd.config import ModelConfig
from herd.errors import HerdError
from herd.threads import peer_environment



def run_peer(cmd: list[str], timeout: float = 3600) -> subprocess.CompletedProcess:
    """`cmd` in a child process with the user's environment; its output captured as text."""
    return subprocess.run(cmd, capture_output=True, text=True, env=peer_environment(), timeout=timeout)


def llama_cpp_binary(name: str) -> str | None:
    """The path of llama.cpp's program `name` (llama-bench, llama-server, ...): in $HERD_LLAMA_CPP (a
    build's bin/ folder, or a checkout with build/bin/ in it), else on PATH; None if neither has it."""
    home = os.environ.get("HERD_LLAMA_CPP")
    folders = [Path(home), Path(home) / "build" / "bin"] if home else []
    return next((str(f / name) for f in folders if (f / name).is_file()), None) or shutil.which(name)


def llama_bench(gguf: Path, prompt: int, tokens: int, threads: int, repeats: int = 3) -> dict:
    """llama-bench's prefill and decode tok/s on `gguf` (mean of `repeats`) and its build."""
    program = llama_cpp_binary("llama-bench")
    if program is None:
        raise HerdError("llama-bench not found: put llama.cpp's build/bin on PATH or set HERD_LLAMA_CPP")
    result = run_peer([program, "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(tokens),
                       "-r", str(repeats), "-o", "csv"])
    if result.returncode != 0:
        raise HerdError(f"llama-bench failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    rows = list(csv.DictReader(result.stdout.strip().splitlines()))
    if not rows:
        raise HerdError("llama-bench printed no results")
    speeds = {("prefill" if int(r["n_prompt"]) else "decode"): float(r["avg_ts"]) for r in rows}
    r = rows[0]
    build = f"llama.cpp {r.get('build_commit', '?')} (build {r.get('build_number', '?')}), {r.get('backends', '?')}"
    return dict(speeds, build=build + (f" on {r['cpu_info']}" if r.get("cpu_info") else ""))


def transformers_kwargs(c: ModelConfig) -> dict:
    """transformers' LlamaConfig keywords for the shape of `c` (for speed: rope scaling is left out)."""
    return dict(hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
                num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, vocab_size=c.vocab_size,
                rms_norm_eps=c.norm_eps, max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings,
                rope_theta=c.rope_theta, attn_implementation="sdpa")


def transformers_row(c: ModelConfig, dtype: str, prompt: int, tokens: int, threads: int) -> dict:
    """transformers' prefill and decode tok/s on random weights of the shape of `c` (hf_peer.py)."""
    spec = {"config": transformers_kwargs(c), "dtype": dtype, "prompt": prompt, "tokens": tokens, "threads": threads}
    result = run_peer([sys.executable, "-P", str(Path(__file__).with_name("hf_peer.py")), json.dumps(spec)])
    if result.returncode != 0:
        raise HerdError(f"transformers failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
