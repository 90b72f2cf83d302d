"""`herd serve --tp 2` as a process, driven by the `openai` client: the same greedy text and
logprobs as one process, requests batched by the engine, and a worker killed mid-service ends the
server with a one-line error within 30 s. Bad --tp settings fail in one line before loading."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import require_shared
from test_serve_cli import free_port, one_line_error, run_main, start, stop

openai = pytest.importorskip("openai")

PROMPTS = ["Once upon a time", "The cat sat", "Lily and Ben went to the park. They"]


def complete(url: str, prompt: str) -> tuple[str, list[float], list[dict]]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    r = client.completions.create(model="stories260K.gguf", prompt=prompt, max_tokens=32, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    return r.choices[0].text, lp.token_logprobs, lp.top_logprobs


def answers(url: str) -> list[tuple]:
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:  # together: batched by the engine
        return list(pool.map(lambda p: complete(url, p), PROMPTS))


@pytest.fixture(scope="module")
def stories():
    return str(require_shared("models", "stories260K", "stories260K.gguf"))


@pytest.fixture(scope="module")
def tp2(stories):
    server, url = start("-m", stories, "--tp", "2")
    yield server, url
    stop(server)


def test_tp2_answers_the_openai_client_as_one_process_does(stories, tp2):
    one, url1 = start("-m", stories)
    try:
        expected = answers(url1)
    finally:
        stop(one)
    got = answers(tp2[1])
    for (text, lps, tops), (text2, lps2, tops2) in zip(expected, got):
        assert text2 == text and len(text) > 20
        assert [list(t) for t in tops2] == [list(t) for t in tops]  # the same top tokens at every step
        # one process sums each dot product in one order, two ranks in another: the last bits differ
        assert max(abs(a - b) for a, b in zip(lps, lps2)) < 1e-4


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def test_killing_a_worker_ends_the_server_with_an_error(tp2):  # last: it takes the server down
    server, url = tp2
    assert complete(url, PROMPTS[0])[0]
    workers = [c for c in _children(server.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    t0 = time.monotonic()
    status = server.wait(30)
    assert time.monotonic() - t0 < 30 and status != 0
    err = server.stderr.read()
    assert "tensor-parallel rank 1 died" in err and "Traceback" not in err


@pytest.mark.parametrize("args, words", [(["--tp", "3"], ["--tp|tensor parallel size 3", "does not divide"]),
                                         (["--tp", "8"], ["more than the model's 4 KV heads"]),
                                         (["--tp", "2", "--quantize", "int8"], ["--quantize", "--tp"]),
                                         (["--tp", "2", "--lora", "a=/x"], ["LoRA", "--tp"]),
                                         (["--tp", "0"], ["tp"])])
def test_bad_tp_settings_are_one_line_errors(stories, capsys, args, words):
    one_line_error(*run_main(["serve", "-m", stories, "--port", str(free_port()), *args], capsys), *words)


def test_under_torchrun_the_ranks_join_its_group(stories):
    import subprocess
    import sys

    def generate(*launcher: str) -> str:
        r = subprocess.run([*launcher, "-m", "herd", "generate", "-m", stories, "-t", "0", "-n", "30",
                            "Once upon a time", *(["--tp", "2"] if len(launcher) > 1 else [])],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    expected = generate(sys.executable)
    assert generate(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2") == expected
