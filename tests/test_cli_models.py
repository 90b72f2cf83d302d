"""Naming models on the command line: every command that takes a model takes a path or a name in
the model store (one resolver), through real `herd` processes."""

import os
import subprocess
import sys

import pytest

STORE_NAME = "smollm2-135m-instruct"


def herd(*args, stdin: str | None = None, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "herd", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_info_takes_a_store_name(smollm2_gguf):
    info = herd("info", STORE_NAME)
    assert info.returncode == 0, info.stderr
    assert "n_layers         30" in info.stdout and "vocab_size       49152" in info.stdout


@pytest.mark.slow
def test_bench_takes_a_store_name(smollm2_gguf):
    bench = herd("bench", STORE_NAME, "--formats", "stored", "--prompt", "4", "--tokens", "2", "--no-transformers",
                 "--no-llama-cpp")
    assert bench.returncode == 0, bench.stderr
    assert "herd          stored" in bench.stdout


def test_info_still_takes_a_registered_config_and_names_both_kinds_when_neither(smollm2_gguf):
    assert "stories15m: 15.2M parameters" in herd("info", "stories15m").stdout
    r = herd("info", "llama-99b")
    assert r.returncode == 2 and "in the store" in r.stderr and "registered config" in r.stderr


@pytest.mark.slow
def test_quantize_takes_a_store_name(smollm2_gguf, tmp_path):
    q = herd("quantize", STORE_NAME, str(tmp_path / "q8"), "--bits", "8")
    assert q.returncode == 0, q.stderr
    assert (tmp_path / "q8" / "herd.json").is_file()


def test_eval_takes_a_store_name(smollm2_gguf, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    ppl = herd("eval", "perplexity", str(text), "-m", STORE_NAME, "--context", "32")
    assert ppl.returncode == 0, ppl.stderr
    assert "perplexity" in ppl.stdout


@pytest.mark.parametrize("args, kind", [(["infill", "--prefix", "def f("], "Code Llama"),
                                        (["guard", "Is this safe?"], "Llama Guard 3")])
def test_guard_and_infill_refuse_the_default_model_before_reading_its_weights(args, kind, smollm2_gguf,
                                                                             monkeypatch, capsys):
    from herd.cli import main

    def no_weights(*_, **__):
        raise AssertionError("the weights were read")

    monkeypatch.setattr("herd.llm.load_model", no_weights)
    code = main(args)  # the default model, which can do neither
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{STORE_NAME} cannot" in err and kind in err and "herd import" in err


def test_the_vocabulary_check_passes_the_kind_of_model_it_asks_for(shared, smollm2_gguf):
    from herd.errors import HerdError
    from herd.llm import check_model_for

    llama3 = shared("tokenizers", "llama3", "tokenizer.model")
    check_model_for("guard", shared("models", "stories260K", "stories260K.bin"), tokenizer=llama3)
    with pytest.raises(HerdError, match="cannot infill"):
        check_model_for("infill", STORE_NAME, tokenizer=llama3)


def herd_in(home, *args, stdin: str | None = None, **env) -> subprocess.CompletedProcess:
    """`herd ARGS` with its own model store in `home`."""
    return herd(*args, stdin=stdin, env={"HERD_HOME": str(home), **env})


def test_import_puts_a_gguf_file_and_a_directory_in_the_store(shared, tmp_path, monkeypatch, capsys):
    from herd.checkpoint import convert
    from herd.cli import main

    def run(*args: str) -> str:
        assert main(list(args)) == 0
        return capsys.readouterr().out

    gguf = shared("models", "stories260K", "stories260K.gguf")
    r = herd_in(tmp_path, "import", str(gguf), "tiny")  # one real process; the rest in this one
    assert r.returncode == 0, r.stderr
    monkeypatch.setenv("HERD_HOME", str(tmp_path))
    run("import", str(convert(gguf, tmp_path / "hf", to="hf")), "tiny-hf")
    listed = run("list")
    assert "tiny " in listed and "tiny-hf " in listed
    expected = run("generate", "-m", str(gguf), "-t", "0", "-n", "30", "Once upon a time")
    assert len(expected) > 40
    for name in ("tiny", "tiny-hf"):
        assert run("generate", "-m", name, "-t", "0", "-n", "30", "Once upon a time") == expected
    assert "dim              64" in run("info", "tiny")


@pytest.mark.parametrize("source, name, says", [
    ("stories260K.gguf", "tiny", "already in the store"),
    ("stories260K.gguf", "../escape", "not a model name"),
    ("tok512.model", "junk", "unknown checkpoint format"),
    ("stories260K.bin", "bin", "convert it"),
    ("missing.gguf", "gone", "no such file"),
])
def test_import_refuses_in_one_line_and_leaves_the_store_as_it_was(source, name, says, shared, tmp_path,
                                                                   monkeypatch, capsys):
    from herd.cli import main

    monkeypatch.setenv("HERD_HOME", str(tmp_path))
    gguf = shared("models", "stories260K", "stories260K.gguf")
    assert main(["import", str(gguf), "tiny"]) == 0
    store = tmp_path / "models"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    assert main(["import", str(gguf.parent / source), name]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not (store.parent / "escape").exists()


def test_run_pulls_a_known_model_and_answers_one_prompt(shared_wheels, tmp_path):
    question = "Name the capital city of France."
    r = herd_in(tmp_path, "run", STORE_NAME, question, "-t", "0", "-n", "20", HERD_FIND_LINKS=str(shared_wheels))
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and f"pulling {STORE_NAME}" in r.stderr
    assert STORE_NAME in herd_in(tmp_path, "list").stdout
    piped = herd_in(tmp_path, "run", STORE_NAME, "-t", "0", "-n", "20", stdin=question + "\n")
    assert piped.returncode == 0 and piped.stdout == r.stdout, piped.stderr


def test_run_without_a_prompt_at_a_terminal_is_a_chat(shared, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    model = shared("models", "stories260K", "stories260K.gguf")
    child = pexpect.spawn(sys.executable, ["-m", "herd", "run", str(model), "-t", "0", "-n", "8"],
                          env={**os.environ, "HERD_HOME": str(tmp_path)}, encoding="utf-8", timeout=120)
    child.expect_exact(">>> ")
    assert "chatting with stories260K.gguf" in child.before
    child.sendline("Once upon a time")
    child.expect_exact(">>> ")  # a reply, then the next prompt
    assert child.before.strip().splitlines()[-1].strip()
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
