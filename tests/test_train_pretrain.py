"""Pretraining from scratch through the `herd` command, as a user runs it: a tokenizer herd trains
itself, prepared shards, a model that beats the unigram baseline and that `herd generate` loads;
a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from herd.errors import HerdError
from herd.model import Transformer
from herd.train.config import TrainConfig, read_recipe
from herd.train.data import Windows, load_corpus
from herd.train.distributed import Dist
from herd.train.objectives import LanguageModeling
from herd.train.recipes import init_weights
from herd.train.trainer import Run, Trainer, learning_rate
from helpers import tiny_config


pytestmark = pytest.mark.usefixtures("one_thread")  # small models, trained in this process


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # see the one_thread fixture


def herd(*args, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "herd", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=ONE_THREAD)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def herd_here(*args) -> tuple[int, str]:
    """`herd ARGS` in this process (no interpreter start-up to pay): (exit status, stderr)."""
    from herd.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, err.getvalue()


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    """Tiny Shakespeare tokenized with a 512-piece tokenizer herd trained on it; 10% held out."""
    from herd.shared import shared_path

    text = shared_path("corpora", "tinyshakespeare_input.txt")
    if not text.exists():
        pytest.skip(f"reference file {text} is absent")
    root = tmp_path_factory.mktemp("shakespeare")
    herd("train-tokenizer", text, "-o", root / "tok", "--vocab-size", 512)
    herd("prepare-data", text, "-o", root / "data", "--tokenizer", root / "tok", "--val-fraction", 0.1)
    return root / "data"


TINY = ["--dim", 64, "--n-layers", 2, "--n-heads", 4, "--n-kv-heads", 2, "--seq-len", 64, "--no-progress"]


@pytest.mark.parametrize("shape,steps,margin", [
    pytest.param(["--dim", 64, "--n-layers", 2, "--n-heads", 4, "--seq-len", 64, "--batch-size", 16], 200, 1.0,
                 id="small"),
    pytest.param(["--dim", 128, "--n-layers", 4, "--n-heads", 4, "--seq-len", 128, "--batch-size", 16], 150, 1.2,
                 id="larger", marks=pytest.mark.slow),
])
def test_pretraining_beats_the_unigram_baseline_and_generate_loads_the_model(shakespeare, tmp_path, shape, steps,
                                                                            margin):
    out = tmp_path / "run"
    assert herd_here("pretrain", "--data", shakespeare, "-o", out, *shape, "--steps", steps, "--lr", 3e-3,
                     "--min-lr", 3e-4, "--warmup", 15, "--eval-every", steps // 2, "--eval-batches", 8,
                     "--no-progress")[0] == 0
    log = metrics(out)
    baseline = log[0]["unigram_val_loss"]
    final = log[-1]["val_loss"]
    print(f"unigram baseline {baseline:.3f} nats/token, validation loss after {steps} steps {final:.3f}")
    assert 4.5 < baseline < 5.5  # the 512-piece vocabulary's unigram entropy on the held-out 10%
    assert final < baseline - margin
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    r = herd("generate", "-m", out / "model", "-t", 0.8, "--seed", 1, "-n", 40, "ROMEO:")
    assert len(r.stdout.split()) > 10


def test_a_run_killed_with_sigkill_resumes_bit_identical(shakespeare, tmp_path):
    args = ["pretrain", "--data", shakespeare, *TINY, "--steps", 30, "--batch-size", 4, "--lr", 1e-3,
            "--warmup", 5, "--save-every", 10, "--eval-every", 15, "--eval-batches", 2]
    herd(*args, "-o", tmp_path / "whole")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "herd", *map(str, args), "-o", killed], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ONE_THREAD)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-00000020").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "model").exists()  # it did not finish
    herd(*args, "-o", killed, "--resume")
    a, b = load_file(tmp_path / "whole" / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r.get("loss") for r in metrics(killed)] == [r.get("loss") for r in metrics(tmp_path / "whole")]
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-00000020", "step-00000030"]


def test_a_recipe_file_sets_options_and_flags_override_it(shakespeare, tmp_path):
    recipe = tmp_path / "run.yaml"
    recipe.write_text(f"data: {shakespeare}\nsteps: 3\nbatch-size: 2\nseq_len: 32\ndim: 32\nn-heads: 2\n"
                      "n_layers: 1\nlr: 0.5\nprogress: false\n")
    out = tmp_path / "run"
    assert herd_here("pretrain", "--config", recipe, "-o", out, "--lr", 0.01)[0] == 0
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 3 and config["seq_len"] == 32 and config["lr"] == 0.01
    assert json.loads((out / "model" / "config.json").read_text())["hidden_size"] == 32
    (tmp_path / "run.toml").write_text('steps = 3\nlearning_rate = 0.1\n')
    code, err = herd_here("pretrain", "--config", tmp_path / "run.toml", "-o", out)
    assert code == 2 and "unknown option(s) learning_rate" in err


@pytest.mark.parametrize("args,message", [
    (["pretrain", "-o", "{tmp}/x"], "no data"),
    (["pretrain", "--data", "{tmp}", "-o", "{tmp}/x"], "not a prepared corpus"),
    (["pretrain", "--data", "{data}", "-o", "{tmp}/x", "--steps", "0"], "steps must be a positive integer"),
    (["pretrain", "--data", "{data}", "-o", "{tmp}/x", "--config", "{tmp}/none.yaml"], "cannot read recipe"),
    (["finetune", "--data", "{data}", "-o", "{tmp}/x", "--lora-targets", "embed_tokens", "-m", "{tmp}"],
     "not linear layers"),
    (["train-tokenizer", "{tmp}/none.txt", "-o", "{tmp}/t"], "no such file"),
    (["prepare-data", "{tmp}/none.txt", "-o", "{tmp}/t", "--tokenizer", "{tmp}"], "no tokenizer.json"),
    (["serve", "--lora", "mascot", "-m", "{tmp}"], "expected NAME=PATH"),
])
def test_bad_training_input_is_a_one_line_error(shakespeare, tmp_path, args, message):
    code, err = herd_here(*(a.format(tmp=tmp_path, data=shakespeare) for a in args))
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_an_output_directory_with_checkpoints_needs_resume(shakespeare, tmp_path):
    args = ["pretrain", "--data", shakespeare, *TINY, "--batch-size", 2, "-o", tmp_path]
    assert herd_here(*args, "--steps", 2)[0] == 0
    code, err = herd_here(*args, "--steps", 2)
    assert code == 2 and "pass --resume" in err
    code, err = herd_here(*args, "--steps", 1, "--resume")
    assert code == 2 and "already trained to step 2, past --steps 1" in err


def kill_before_publishing(monkeypatch, name: str) -> None:
    """Make the next run stop as a kill would after its last checkpoint, just before OUT/name is
    renamed into place (its temporary copy half written)."""
    from herd.train import recipes

    publish = recipes._publish

    def killed(run_dir, target, *args):
        if target == name:
            (run_dir / f".tmp-{name}").mkdir()
            raise KeyboardInterrupt
        return publish(run_dir, target, *args)

    monkeypatch.setattr(recipes, "_publish", killed)


def files(directory) -> dict[str, tuple[int, int]]:
    """name -> (inode, modification time): changes if a file is written again."""
    return {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in directory.iterdir()}


def same_weights(a, b) -> bool:
    a, b = load_file(a), load_file(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_killed_before_its_model_was_written_writes_it_on_resume(shakespeare, tmp_path, monkeypatch):
    import herd as herd_api

    args = ["pretrain", "--data", shakespeare, *TINY, "--batch-size", 2, "--keep", 1]
    assert herd_here(*args, "--steps", 3, "-o", tmp_path / "whole")[0] == 0
    run = tmp_path / "killed"
    with monkeypatch.context() as m:
        kill_before_publishing(m, "model")
        assert herd_here(*args, "--steps", 3, "-o", run)[0] == 130
    assert not (run / "model").exists()
    assert herd_here(*args, "--steps", 3, "-o", run, "--resume") == (0, "")
    assert same_weights(tmp_path / "whole" / "model" / "model.safetensors", run / "model" / "model.safetensors")
    assert herd_api.load(run / "model").generate("ROMEO:", max_tokens=3, temperature=0)
    published = files(run / "model")
    assert herd_here(*args, "--steps", 3, "-o", run, "--resume") == (0, "")
    assert files(run / "model") == published  # nothing written again
    # trained further and killed again: the model of step 3 is not taken for that of step 5
    with monkeypatch.context() as m:
        kill_before_publishing(m, "model")
        assert herd_here(*args, "--steps", 5, "-o", run, "--resume")[0] == 130
    assert herd_here(*args, "--steps", 5, "-o", run, "--resume") == (0, "")
    assert not same_weights(tmp_path / "whole" / "model" / "model.safetensors", run / "model" / "model.safetensors")
    assert same_weights(run / "checkpoints" / "step-00000005" / "export" / "model.safetensors",
                        run / "model" / "model.safetensors")


@pytest.mark.parametrize("killed_before", ["adapter", "model"])
def test_a_finetune_killed_before_its_exports_were_written_writes_them_on_resume(shakespeare, tmp_path, monkeypatch,
                                                                                 killed_before):
    base = tmp_path / "base"
    assert herd_here("pretrain", "--data", shakespeare, *TINY, "--steps", 1, "--batch-size", 2, "-o", base)[0] == 0
    args = ["finetune", "-m", base / "model", "--data", shakespeare, "--lora-r", 4, "--steps", 2, "--batch-size", 2,
            "--seq-len", 32, "--merge", "--no-progress"]
    torch.manual_seed(0)  # LoRA initialises its adapters from torch's global generator
    assert herd_here(*args, "-o", tmp_path / "whole")[0] == 0
    run = tmp_path / "killed"
    with monkeypatch.context() as m:
        kill_before_publishing(m, killed_before)
        torch.manual_seed(0)
        assert herd_here(*args, "-o", run)[0] == 130
    assert not (run / killed_before).exists()
    assert herd_here(*args, "-o", run, "--resume") == (0, "")
    for name, weights in [("adapter", "adapter_model.safetensors"), ("model", "model.safetensors")]:
        assert same_weights(tmp_path / "whole" / name / weights, run / name / weights)
    published = {name: files(run / name) for name in ("adapter", "model")}
    assert herd_here(*args, "-o", run, "--resume") == (0, "")
    assert {name: files(run / name) for name in ("adapter", "model")} == published


# ---- the loop itself, in process ----

def tiny_run(shakespeare, out, **cfg) -> tuple[Trainer, list[dict]]:
    corpus = load_corpus(shakespeare)
    config = TrainConfig(out=str(out), **{"steps": 4, "seq_len": 32, "lr": 1e-2, "progress": False, "log_every": 1,
                                          **cfg})
    model = init_weights(Transformer(tiny_config("llama3", vocab_size=512)), seed=0)
    rows = config.batch_size * config.grad_accum
    run = Run(model, LanguageModeling(), Windows(corpus.train, 32, rows, 0), None, lambda *a: None,
              data=corpus.fingerprint())
    trainer = Trainer(run, config, Dist())
    trainer.fit()
    return trainer, [r for r in metrics(out) if "loss" in r]


def test_gradient_accumulation_equals_the_larger_batch(shakespeare, tmp_path):
    _, whole = tiny_run(shakespeare, tmp_path / "a", batch_size=4)
    _, split = tiny_run(shakespeare, tmp_path / "b", batch_size=1, grad_accum=4)
    assert [r["loss"] for r in whole] == pytest.approx([r["loss"] for r in split], rel=1e-5)


def test_activation_checkpointing_changes_memory_not_results(shakespeare, tmp_path):
    plain, a = tiny_run(shakespeare, tmp_path / "a", batch_size=2)
    ckpt, b = tiny_run(shakespeare, tmp_path / "b", batch_size=2, activation_checkpointing=True)
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)
    for p, q in zip(plain.run.model.parameters(), ckpt.run.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


@pytest.mark.slow  # compiling takes ~30 s on one core
def test_compiled_blocks_train_like_eager_ones(shakespeare, tmp_path):
    eager, a = tiny_run(shakespeare, tmp_path / "a", batch_size=2)
    compiled, b = tiny_run(shakespeare, tmp_path / "b", batch_size=2, compile=True)
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-4)
    assert list(eager.run.model.state_dict()) == list(compiled.run.model.state_dict())  # names unchanged


def test_compile_without_a_cpp_compiler_says_so(monkeypatch):
    import torch._inductor.cpp_builder

    from herd.train.trainer import compile_blocks

    def missing():
        raise torch._inductor.exc.InvalidCxxCompiler()

    monkeypatch.setattr(torch._inductor.cpp_builder, "get_cpp_compiler", missing)
    model = Transformer(tiny_config())
    with pytest.raises(HerdError, match="no C.. compiler found"):
        compile_blocks(model, torch.device("cpu"))


def test_bf16_autocast_trains(shakespeare, tmp_path):
    _, log = tiny_run(shakespeare, tmp_path, batch_size=2, precision="bf16", steps=3)
    assert all(r["loss"] == r["loss"] for r in log) and log[-1]["loss"] < log[0]["loss"]


def test_learning_rate_warms_up_then_follows_the_cosine():
    cfg = TrainConfig(out="x", steps=110, lr=1.0, min_lr=0.1, warmup=10)
    assert [learning_rate(s, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert learning_rate(60, cfg) == pytest.approx(0.55)
    assert learning_rate(110, cfg) == pytest.approx(0.1)


def test_recipe_files_are_flat_mappings(tmp_path):
    (tmp_path / "a.toml").write_text('steps = 5\nbatch-size = 2\n')
    assert read_recipe(tmp_path / "a.toml") == {"steps": 5, "batch_size": 2}
    (tmp_path / "b.yaml").write_text("model:\n  dim: 4\n")
    with pytest.raises(HerdError, match="flat mapping"):
        read_recipe(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("steps: [\n")
    with pytest.raises(HerdError, match="invalid recipe"):
        read_recipe(tmp_path / "c.yaml")


def test_killed_runs_leave_no_partial_checkpoint(tmp_path):
    """A checkpoint directory is only ever complete: its temporary name is not a checkpoint."""
    from herd.train.checkpointing import checkpoints

    root = tmp_path / "checkpoints"
    (root / ".tmp-step-00000020" / "state").mkdir(parents=True)
    (root / "step-00000010").mkdir()
    (root / "step-00000010" / "trainer.json").write_text("{}")
    assert [p.name for p in checkpoints(tmp_path)] == ["step-00000010"]
