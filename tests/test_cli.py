"""The `herd` command as a user runs it: real processes, real stdin/stdout, exit codes."""

import os
import subprocess
import sys

import pytest


def herd(*args, stdin: str | None = None, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "herd", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_generate_with_the_default_model_knows_paris(smollm2_gguf):
    r = herd("generate", "--temperature", "0", "-n", "20", "The capital of France is")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_chat_holds_a_conversation_through_stdin(smollm2_gguf):
    turns = "My favourite colour is green.\nWhat is my favourite colour?\n"
    kept = herd("chat", "-t", "0", "-n", "24", stdin=turns)
    reset = herd("chat", "-t", "0", "-n", "24", stdin=turns.replace("\nWhat", "\n/reset\nWhat"))
    assert kept.returncode == 0 and reset.returncode == 0, kept.stderr + reset.stderr
    assert "conversation cleared" in reset.stderr
    # both answer the first turn the same way; the second answer depends on the history
    first = os.path.commonprefix([kept.stdout, reset.stdout])
    assert len(first.strip()) > 20 and first.count("\n") >= 1
    assert kept.stdout != reset.stdout
    assert kept.stdout[len(first):].strip() and reset.stdout[len(first):].strip()


def test_generate_reads_the_prompt_from_stdin(smollm2_gguf):
    r = herd("generate", "-t", "0", "-n", "16", stdin="The capital of France is\n")
    assert r.returncode == 0 and "Paris" in r.stdout


def test_pull_list_rm(shared_wheels, tmp_path):
    env = {"HERD_HOME": str(tmp_path)}
    r = herd("pull", "--find-links", str(shared_wheels), env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(".gguf")
    assert "smollm2-135m-instruct" in herd("list", env=env).stdout
    assert herd("rm", "smollm2-135m-instruct", env=env).returncode == 0
    assert "no models" in herd("list", env=env).stdout


@pytest.mark.parametrize("args", [
    ["generate", "-n", "0", "hi"],
    ["generate", "--temperature", "-1", "hi"],
    ["generate", "--top-p", "nan", "hi"],
    ["generate", "-m", "/no/such/model", "hi"],
    ["generate", "--max-tokens", "many", "hi"],
    ["info", "/no/such/file.gguf"],
    ["info", "llama-99b"],
    ["convert", "/no/such/dir", "/tmp/out", "--to", "hf"],
    ["convert", "a", "b", "--to", "onnx"],
    ["rm", "never-pulled"],
    ["pull", "gpt-5"],
    ["frobnicate"],
])
def test_bad_input_is_one_line_and_exit_2(args):
    r = herd(*args, env={"HERD_HOME": "/tmp/herd-test-empty-home"})
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr and "error" in r.stderr


def test_prompt_longer_than_the_context(shared):
    model = shared("models", "stories260K", "stories260K.bin")
    r = herd("generate", "-m", str(model), "word " * 600)
    assert r.returncode == 2 and "context is 512 tokens" in r.stderr


def test_every_command_has_help():
    for command in ["generate", "chat", "info", "convert", "pull", "list", "rm"]:
        r = herd(command, "--help")
        assert r.returncode == 0 and "usage: herd " + command in r.stdout
