"""`herd chat` as a user runs it, a real process fed on standard input with the default model:
a message too long for the context is refused and the chat goes on, a conversation that outgrows
the context drops its oldest turns (never the system prompt), \"\"\" blocks, /set, /save, /load
and --verbose."""

import json
import os
import pty
import re
import select
import signal
import sys
import time

from test_cli import herd


def chat(*args: str, stdin: str):
    r = herd("chat", "-t", "0", *args, stdin=stdin)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    return r


def replies(stderr: str) -> list[int]:
    """The reply token counts --verbose printed."""
    return [int(n) for n in re.findall(r"reply: (\d+) tokens, [\d.]+ tok/s", stderr)]


def test_a_message_too_long_is_refused_and_old_turns_make_room(smollm2_gguf, tmp_path):
    # before, a message longer than the context ended herd chat (exit 2) and the conversation was lost
    saved = tmp_path / "conversation.json"
    turns = [f"Tell me something about the number {n}, in one short sentence please." for n in range(1, 6)]
    long = "word " * 300
    r = chat("--ctx", "160", "-n", "10", "--system", "You are terse.",
             stdin="\n".join([turns[0], long, *turns[1:], f"/save {saved}"]) + "\n")
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "too long" in errors[0] and "context is 160 tokens" in errors[0], r.stderr
    assert "outgrew the context of 160 tokens: dropped the oldest" in r.stderr
    assert "kept the system prompt" in r.stderr
    messages = json.loads(saved.read_text())["messages"]
    assert messages[0] == {"role": "system", "content": "You are terse."}
    assert messages[1]["role"] == "user" and messages[1]["content"] != turns[0]
    assert messages[-2] == {"role": "user", "content": turns[-1]} and messages[-1]["content"]
    assert long.strip() not in [m["content"].strip() for m in messages]
    assert r.stdout.count("\n") >= len(turns)  # every other turn answered


def test_multi_line_set_save_load_and_verbose(smollm2_gguf, tmp_path):
    saved, again, bad = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "bad.json"
    bad.write_text('{"messages": [{"role": "wizard", "content": "hi"}]}')
    lines = ['"""Remember these two', "words: apple, moon.", '"""',
             "/set temperature -1", "/set max_tokens 3", "/set parameter num_predict many",
             "What are the two words?",
             "/set parameter num_predict 5", "/set system Answer briefly.", f"/save {saved}",
             "/load /no/such/file.json", f"/load {bad}", "/load", "/frobnicate",
             "/reset", f"/load {saved}", "Repeat them.", f"/save {again}"]
    r = chat("-n", "8", "--verbose", stdin="\n".join(lines) + "\n")
    errors = [line for line in r.stderr.splitlines() if line.startswith(("herd chat: error", "unknown command"))]
    assert len(errors) == 6, r.stderr  # one line each, and the chat went on
    assert "temperature must be >= 0" in errors[0] and "'many' is not an integer" in errors[1]
    assert "/no/such/file.json" in errors[2] and "message 1 is not" in errors[3] and "/load needs" in errors[4]
    assert replies(r.stderr) == [8, 3, 5]  # -n, then /set max_tokens, then Ollama's num_predict (from the file)
    first = json.loads(saved.read_text())
    assert first["messages"][0] == {"role": "system", "content": "Answer briefly."}
    assert first["messages"][1] == {"role": "user", "content": "Remember these two\nwords: apple, moon."}
    assert first["options"]["max_tokens"] == 5 and first["options"]["temperature"] == 0
    second = json.loads(again.read_text())["messages"]
    assert second[:-2] == first["messages"] and second[-2]["content"] == "Repeat them."


def test_at_a_terminal(smollm2_gguf):
    """The interactive path (input() with readline, ... for a continued line), through a pty, as
    `herd run MODEL` without a prompt starts it."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: herd at a terminal
        os.execvp(sys.executable, [sys.executable, "-m", "herd", "run", str(smollm2_gguf), "-t", "0", "-n", "6"])
    seen, at = b"", 0

    def until(text: bytes, seconds: float = 120) -> None:
        """Read the terminal until `text` appears after what the last call found."""
        nonlocal seen, at
        deadline = time.monotonic() + seconds
        while seen.find(text, at) < 0 and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    seen += os.read(fd, 4096)
                except OSError:  # the child has gone
                    break
        found = seen.find(text, at)
        assert found >= 0, (text, seen.decode(errors="replace"))
        at = found + len(text)

    try:
        until(b">>> ")
        os.write(fd, b'"""What is the capital\r')
        until(b"... ")
        os.write(fd, b'of France?"""\r')
        until(b"Paris")
        until(b">>> ", 60)
        os.write(fd, b"/set max_tokens 0\r")
        until(b"max_tokens must be a positive integer")
        until(b">>> ", 10)
        os.write(fd, b"\x04")  # Ctrl-D
        _, status = os.waitpid(pid, 0)
        pid = None
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
