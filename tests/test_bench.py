"""`herd bench`: the bytes a decode step streams, the command end to end on a tiny config, and its
peers (llama-bench, transformers) run in the user's environment, not in the one herd set up for
its own threads."""

import json
import os
import stat
import subprocess
import sys

import pytest

from herd.bench import bench, random_model, streamed_bytes
from herd.bench.machine import cpu, cpu_line
from herd.bench.peers import llama_cpp_binary, transformers_row
from herd.config import get_config
from herd.errors import HerdError

# a user who set none of herd's OpenMP variables (herd sets them in this test process at import)
USER_ENV = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "HERD_SET_ENV")}

# llama-bench stand-in: records the environment it was started with, prints llama-bench's CSV
FAKE_LLAMA_BENCH = """#!{python}
import json, os, sys
json.dump(dict(os.environ), open(os.environ["FAKE_ENV_OUT"], "w"))
n_prompt, n_gen = sys.argv[sys.argv.index("-p") + 1], sys.argv[sys.argv.index("-n") + 1]
print("build_commit,build_number,cpu_info,backends,n_prompt,n_gen,avg_ts")
print(f"fake123,42,Some CPU,CPU,{{n_prompt}},0,1000.5")
print(f"fake123,42,Some CPU,CPU,0,{{n_gen}},100.25")
"""


def test_streamed_bytes():
    cfg = get_config("stories15m")  # tied: the embedding is the output matrix, counted once
    assert streamed_bytes(random_model("stories15m", "f32")) == 4 * cfg.num_params()
    int8 = random_model("stories15m", "int8")  # int8 + an fp16 scale per 32 weights; norms fp32
    norms = cfg.dim * (2 * cfg.n_layers + 1)
    assert streamed_bytes(int8) == (cfg.num_params() - norms) * (1 + 2 / 32) + 4 * norms


def _herd_bench(env: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "herd", "bench", "stories260k", "--prompt", "8", "--tokens", "4",
                           "--no-transformers", *extra], capture_output=True, text=True, timeout=600, env=env)


def test_bench_command():
    r = _herd_bench(USER_ENV, "--formats", "f32,int4", "--no-llama-cpp")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == cpu_line() and lines[1].startswith("memory bandwidth") and len(lines) == 6
    for line, fmt in zip(lines[3:5], ("f32", "int4")):
        engine, form, prefill, decode, mb, frac, rss = line.split()
        assert (engine, form) == ("herd", fmt)
        assert float(prefill) > 0 and float(decode) > 0 and float(frac) >= 0 and float(rss) > 50
    assert lines[5].startswith("herd: herd ") and "torch " in lines[5]


@pytest.mark.parametrize("user_policy", [None, "active"])
def test_llama_bench_runs_in_the_users_environment(tmp_path, user_policy):
    """herd sets OMP_WAIT_POLICY=passive for itself; llama-bench must get what the user had (llama.cpp's
    threads sleeping between operations cut its Q8_0 decode 5x), and report its build."""
    fake = tmp_path / "bin" / "llama-bench"
    fake.parent.mkdir()
    fake.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(USER_ENV, PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}", FAKE_ENV_OUT=str(tmp_path / "env.json"))
    env.pop("HERD_LLAMA_CPP", None)
    if user_policy:
        env["OMP_WAIT_POLICY"] = user_policy
    r = _herd_bench(env, "--formats", "int8")
    assert r.returncode == 0, r.stderr
    seen = json.loads((tmp_path / "env.json").read_text())
    assert seen.get("OMP_WAIT_POLICY") == user_policy and "HERD_SET_ENV" not in seen
    assert seen["FAKE_ENV_OUT"] == env["FAKE_ENV_OUT"]  # the rest of the user's environment is kept
    assert ["llama.cpp", "q8_0", "1000.5", "100.2"] in [line.split() for line in r.stdout.splitlines()]
    assert "herd / llama.cpp, int8: prefill " in r.stdout
    assert "llama.cpp: llama.cpp fake123 (build 42), CPU on Some CPU" in r.stdout.splitlines()


def test_transformers_runs_in_the_users_environment(tmp_path, monkeypatch):
    """transformers runs as a script in a child process (it would inherit herd's setting in-process)."""
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\nimport json, os\n"
                    f"json.dump(dict(os.environ), open({str(tmp_path / 'env.json')!r}, 'w'))\n"
                    "print(json.dumps({'prefill': 1.0, 'decode': 1.0, 'build': 'fake'}))\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(sys, "executable", str(fake))
    monkeypatch.setenv("HERD_SET_ENV", "OMP_WAIT_POLICY")
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert transformers_row(get_config("stories260k"), "float32", 8, 4, 1)["build"] == "fake"
    seen = json.loads((tmp_path / "env.json").read_text())
    assert "OMP_WAIT_POLICY" not in seen and "HERD_SET_ENV" not in seen and seen["PATH"] == os.environ["PATH"]


def test_transformers_row_real():
    row = transformers_row(get_config("stories260k"), "float32", 8, 4, 1)
    assert row["prefill"] > 0 and row["decode"] > 0 and row["rss"] > 50
    assert row["build"].startswith("transformers ") and ", torch " in row["build"]


@pytest.mark.skipif(llama_cpp_binary("llama-bench") is None,
                    reason="llama.cpp's llama-bench is neither on PATH nor in $HERD_LLAMA_CPP")
def test_bench_beside_real_llama_cpp():
    r = _herd_bench(dict(os.environ), "--formats", "int4")
    assert r.returncode == 0, r.stderr
    peer = [line.split() for line in r.stdout.splitlines() if line.split()[:2] == ["llama.cpp", "q4_0"]]
    assert len(peer) == 1 and float(peer[0][2]) > 0 and float(peer[0][3]) > 0
    assert any(line.startswith("llama.cpp: llama.cpp ") for line in r.stdout.splitlines())


def test_cpu_line_names_the_instruction_sets():
    xeon = cpu("model name\t: Intel(R) Xeon(R) Platinum 8480+\ncpu family\t: 6\nmodel\t\t: 143\n"
               "flags\t\t: fpu avx2 fma avx512f avx512_vnni avx512_bf16 avx_vnni amx_tile amx_int8 amx_bf16\n")
    assert cpu_line(xeon).startswith("CPU: Intel(R) Xeon(R) Platinum 8480+ (family 6 model 143), ")
    assert "lacks AVX-512 BW" in cpu_line(xeon) and cpu_line(xeon).count("AMX") == 3
    assert cpu_line(dict(xeon, flags=set())).endswith("instruction sets unknown (no /proc/cpuinfo)")


def test_bench_command_errors():
    r = subprocess.run([sys.executable, "-m", "herd", "bench"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "needs a model" in r.stderr and "Traceback" not in r.stderr


def test_bench_errors():
    with pytest.raises(HerdError, match="unknown format"):
        bench("stories260k", ["int3"])
    with pytest.raises(HerdError, match="stories9"):
        bench("stories9", ["f32"])


def test_kernel_bench():
    from herd.bench.kernels import FORMATS, kernel_bench, kernel_report

    shapes = [("decode, streamed", 256, 1024, 1), ("decode, in cache", 128, 512, 1), ("prefill", 256, 512, 64)]
    result = kernel_bench(threads=1, stream_bytes=4 << 20, seconds=0.05, shapes=shapes)
    assert len(result["rows"]) == len(FORMATS) * len(shapes)
    assert all(r["matrices"] == (4 << 20) // r["bytes"] > 1 for r in result["rows"][:len(FORMATS)])  # streamed
    for r in result["rows"]:
        n, k = map(int, r["shape"].split("x"))
        assert r["gflops"] > 0 and r["gbs"] > 0 and r["isa"] == "default"
        assert abs(r["gflops"] * 1e9 / (2 * n * k * r["tokens"]) * r["bytes"] / (r["gbs"] * 1e9) - 1) < 1e-6
    flags = cpu()["flags"]
    assert ("fp32 FMA, AVX2" in result["peaks"]) == ({"avx2", "fma"} <= flags)
    assert ("int8 VNNI, 512-bit" in result["peaks"]) == ({"avx512f", "avx512_vnni"} <= flags)
    text = kernel_report(result).splitlines()
    assert text[0] == cpu_line() and len(text) == 4 + len(result["rows"])
    assert text[4].split()[:2] == ["default", "f32"] and text[4].endswith("of bandwidth")


def test_fma_peak_is_at_least_what_torch_reaches():
    """The measured peak is real arithmetic: not below what torch's sgemm does on a cache-resident
    product (half of it: a shared machine), which it would be if the chains were too few."""
    import time

    import torch

    from herd.bench.kernels import peaks

    a = torch.randn(256, 256)
    best = float("inf")
    for _ in range(20):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    torch_gflops = 2 * 256**3 / best / 1e9 / torch.get_num_threads()
    fma = max(v for name, v in peaks(1, 2_000_000).items() if name.startswith("fp32"))
    assert fma > 0.5 * torch_gflops
