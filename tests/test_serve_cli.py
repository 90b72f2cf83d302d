"""`herd serve` as a process: it serves, refuses bad settings in one line, and shuts down
gracefully on SIGTERM (running requests finish, then it exits cleanly)."""

import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from conftest import require_shared


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def herd(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "herd", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


@pytest.fixture
def stories():
    return str(require_shared("models", "stories260K", "stories260K.gguf"))


def test_bad_settings_are_one_line_errors(stories, capsys):
    from herd.cli import main

    for args, message in [(["--max-batch", "0"], "max_batch must be a positive integer"),
                          (["--kv-memory", "0.000001"], "holds no slot"),
                          (["--kv-memory", "-1"], "--kv-memory must be > 0"),
                          (["--guard", "/no/such/guard"], "/no/such/guard")]:
        assert main(["serve", "-m", stories, "--port", str(free_port()), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_sigterm_lets_running_requests_finish_then_exits(stories):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    p = herd("serve", "-m", stories, "--port", str(port), "--ctx", "512")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() is not None else ""
            time.sleep(0.2)
        body = {"model": "stories260K.gguf", "prompt": "Once upon a time", "max_tokens": 300, "temperature": 1,
                "stream": True, "logit_bias": {"2": -100}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            p.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2].removeprefix("data: "))
        assert last["choices"][0]["finish_reason"] == "length"  # it ran to the end
        assert p.wait(timeout=30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
