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
