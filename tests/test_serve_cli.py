"""`herd serve` as a process: it refuses bad settings in one line (an empty API key, a port in
use) before loading the model, says it is serving only once it listens, and shuts down
gracefully on SIGTERM: running requests finish, and past the drain timeout what still waits gets
503 and what still streams ends with an error event, in each API's own shape."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import require_shared
from herd.cli import main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def herd(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "herd", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def start(*args, **kw) -> tuple[subprocess.Popen, str]:
    """`herd serve ARGS --port 0` and the URL it says it serves on."""
    p = herd("serve", *args, "--port", "0", **kw)
    line = p.stdout.readline()
    if not line:
        pytest.fail(f"herd serve exited {p.wait()}: {p.stderr.read()}")
    return p, re.search(r" on (http://\S+) ", line).group(1)


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
        p.wait()


def run_main(args: list[str], capsys) -> tuple[int, str]:
    """main(ARGS)'s exit status and standard error (argparse's own errors exit instead of returning)."""
    try:
        status = main(args)
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


@pytest.fixture
def stories():
    return str(require_shared("models", "stories260K", "stories260K.gguf"))


def one_line_error(status: int, err: str, *words: str) -> None:
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert re.search(word, err), (word, err)


def test_bad_settings_are_one_line_errors(stories, capsys):
    for args, words in [(["--max-batch", "0"], ["max.batch"]),
                        (["--kv-memory", "0.000001"], ["holds no slot"]),
                        (["--kv-memory", "-1"], ["kv-memory", "> 0"]),
                        (["--guard", "/no/such/guard"], ["/no/such/guard"]),
                        (["--drain-timeout", "-1"], ["drain-timeout"])]:
        one_line_error(*run_main(["serve", "-m", stories, "--port", str(free_port()), *args], capsys), *words)


def test_an_empty_or_unusable_api_key_is_refused(stories, capsys, tmp_path, monkeypatch):
    empty, blank, missing = tmp_path / "empty", tmp_path / "blank", tmp_path / "missing"
    empty.write_text("")
    blank.write_text(" \n")
    for args, words in [(["--api-key", ""], ["--api-key", "empty"]), (["--api-key", "  "], ["empty"]),
                        (["--api-key", "two words"], ["printable ASCII"]), (["--api-key", "clé"], ["printable ASCII"]),
                        (["--api-key-file", str(empty)], ["empty"]), (["--api-key-file", str(blank)], ["empty"]),
                        (["--api-key-file", str(missing)], ["missing", "No such file"]),
                        (["--api-key-file", str(tmp_path)], ["cannot read"]),
                        (["--api-key", "k", "--api-key-file", str(empty)], ["not allowed with"])]:
        one_line_error(*run_main(["serve", "-m", stories, "--port", str(free_port()), *args], capsys), *words)
    monkeypatch.setenv("HERD_API_KEY", "")
    one_line_error(*run_main(["serve", "-m", stories, "--port", str(free_port())], capsys), "HERD_API_KEY", "empty")


def test_the_api_key_can_come_from_a_file_or_the_environment(stories, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    env = {"HERD_API_KEY": "env-key"}
    for args, key in [(["--api-key-file", str(key_file)], "s3cret-key"), ([], "env-key")]:
        p, url = start("-m", stories, *args, env={**os.environ, **env})
        try:
            assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
            r = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
            assert r.status_code == 200, r.text
        finally:
            stop(p)


def test_a_port_in_use_fails_in_one_line_before_the_model_loads(capsys):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        # the model does not exist: had it been loaded first, that would be the error
        status, err = run_main(["serve", "-m", "/no/such/model", "--port", str(port)], capsys)
    one_line_error(status, err, f"cannot listen on 127.0.0.1:{port}", "in use")


def test_it_says_serving_only_once_it_listens(stories):
    p, url = start("-m", stories)
    try:
        assert not url.endswith(":0")
        assert httpx.get(url + "/health", timeout=30).status_code == 200  # at once: no retrying
    finally:
        stop(p)


def test_sigterm_lets_running_requests_finish_then_exits(stories):
    p, url = start("-m", stories, "--ctx", "512")
    try:
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
        stop(p)


class Client(threading.Thread):
    """A request in a thread of its own: its status and the lines of its reply, as they come."""

    def __init__(self, url: str, path: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.path, self.body = url, path, body
        self.status, self.lines = None, []

    def run(self):
        with httpx.stream("POST", self.url + self.path, json=self.body, timeout=120) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if line:
                    self.lines.append(line)


def test_past_the_drain_what_waits_gets_503_and_streams_end_with_an_error(smollm2_gguf):
    """Two long streams hold both slots and three requests wait when SIGTERM comes; after a drain
    of 1 s, each ends as its protocol says."""
    p, url = start("-m", str(smollm2_gguf), "--max-batch", "2", "--ctx", "2048", "--drain-timeout", "1")
    try:
        name = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        endless = {"0": -100, "2": -100}  # SmolLM2's end tokens
        running = [Client(url, "/v1/completions", {"model": name, "prompt": "Once upon a time", "max_tokens": 2000,
                                                   "stream": True, "logit_bias": endless}),
                   Client(url, "/api/generate", {"model": name, "prompt": "A long story:", "raw": True,
                                                 "format": {"type": "string", "minLength": 8000},
                                                 "options": {"num_predict": 2000}})]
        waiting = [Client(url, "/v1/completions", {"model": name, "prompt": "Hi", "max_tokens": 5}),
                   Client(url, "/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "Hi"}],
                                                        "stream": True}),
                   Client(url, "/api/chat", {"model": name, "messages": [{"role": "user", "content": "Hi"}]})]
        for client in running:
            client.start()
        wait_for(lambda: all(len(c.lines) >= 2 for c in running))
        for client in waiting:
            client.start()
        wait_for(lambda: httpx.get(url + "/health", timeout=10).json()["waiting"] == 3)
        p.send_signal(signal.SIGTERM)
        for client in running + waiting:
            client.join(60)
        assert p.wait(timeout=30) == 0

        openai_stream, ollama_stream = (c.lines for c in running)
        assert openai_stream[-1] == "data: [DONE]"
        error = json.loads(openai_stream[-2].removeprefix("data: "))["error"]
        assert "shutting down" in error["message"] and error["code"] == "shutting_down"
        assert "shutting down" in json.loads(ollama_stream[-1])["error"]
        for client in waiting:
            assert client.status == 503, (client.path, client.lines)
            error = json.loads("".join(client.lines))["error"]
            message = error if client.path.startswith("/api/") else error["message"]
            assert "shutting down" in message
    finally:
        stop(p)


def wait_for(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
