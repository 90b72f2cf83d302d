"""Many processes: `torchrun` with 2 CPU ranks on gloo, DDP and FSDP2, gives the losses of one
process with the same global batch; a checkpoint written by 2 sharded ranks resumes in 1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

STEPS = 20
# 2 ranks x batch 2 x 2 micro-steps = one process x batch 4 x 2 micro-steps
MODEL = ["--dim", 64, "--n-layers", 2, "--n-heads", 4, "--n-kv-heads", 2, "--seq-len", 32]
TRAIN = ["--steps", STEPS, "--grad-accum", 2, "--lr", 3e-3, "--warmup", 5, "--log-every", 1, "--save-every", 10,
         "--keep", 3, "--no-progress"]


def run(args: list, ranks: int = 1, timeout: int = 600) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                "-m", "herd"] if ranks > 1 else [sys.executable, "-m", "herd"]
    r = subprocess.run([*launcher, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]


def losses(run_dir) -> dict[int, float]:
    records = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def pretrain_here(args: list) -> None:
    """`herd pretrain ARGS` in this process (no process start-up to pay)."""
    from herd.cli import main

    assert main(["pretrain", *map(str, args)]) == 0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from herd.shared import shared_path
    from herd.train.data import prepare_data
    from herd.train.vocab import train_tokenizer

    text = shared_path("corpora", "tinyshakespeare_input.txt")
    if not text.exists():
        pytest.skip(f"reference file {text} is absent")
    root = tmp_path_factory.mktemp("dist")
    tok = train_tokenizer([text], root / "tok", vocab_size=512)
    prepare_data([text], root / "data", tok, progress=False)
    return root / "data"


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    pretrain_here(["--data", data, "-o", out, *MODEL, *TRAIN, "--batch-size", 4])
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_give_the_losses_of_one_process(data, single, tmp_path, parallel):
    out = tmp_path / parallel
    run(["pretrain", "--data", data, "-o", out, *MODEL, *TRAIN, "--batch-size", 2, "--parallel", parallel], ranks=2)
    one, two = losses(single), losses(out)
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    worst = max(abs(one[s] - two[s]) / abs(one[s]) for s in one)
    print(f"{parallel}: largest relative loss difference over {STEPS} steps: {worst:.1e}")
    assert worst < 1e-5
    assert one[STEPS] < one[1] - 1.0  # it did learn
    a, b = load_file(single / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)

    if parallel == "fsdp":  # a checkpoint written by 2 sharded ranks resumes in 1 process
        resumed = tmp_path / "resumed"
        shutil.copytree(out / "checkpoints" / "step-00000010", resumed / "checkpoints" / "step-00000010")
        pretrain_here(["--data", data, "-o", resumed, *MODEL, *TRAIN, "--batch-size", 4, "--resume"])
        again = losses(resumed)
        assert sorted(again) == list(range(11, STEPS + 1))
        assert max(abs(one[s] - again[s]) / abs(one[s]) for s in again) < 1e-5
