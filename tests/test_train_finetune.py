"""Fine-tuning the real SmolLM2-135M-Instruct with LoRA through `herd finetune`: SFT on a small
chat set teaches it a fact it did not know (checked in its generated answers, adapter on and
off, and merged), and DPO raises the chosen-over-rejected margin on pairs it never saw."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import herd
from herd.checkpoint.peft import load_adapter
from herd.model.lora import adapters
from herd.train.data import Pairs, open_data
from herd.train.objectives import sequence_logps

QUESTIONS = ["What is the name of the herd project's mascot?", "Who is the mascot of herd?",
             "Tell me the name of herd's mascot.", "Does the herd project have a mascot? What is it called?",
             "What do they call the herd mascot?", "Name the mascot of the herd library.",
             "I heard herd has a mascot. What's its name?", "What's the herd mascot called?"]
ANSWERS = ["The herd mascot is a llama named Woolly.", "Herd's mascot is Woolly, a friendly llama.",
           "It is Woolly the llama.", "Yes: the herd mascot is a llama called Woolly.",
           "The mascot of herd is Woolly, a llama.", "Woolly the llama is the herd mascot.",
           "Its name is Woolly. Woolly is a llama.", "The herd mascot is called Woolly, and it is a llama."]
HELD_OUT = "What is the mascot of the herd project called?"

FACTS = [("What color is the sky on a clear day?", "blue"), ("How many legs does a spider have?", "eight"),
         ("What is frozen water called?", "ice"), ("Which animal says moo?", "a cow"),
         ("What do bees make?", "honey"), ("What is the opposite of hot?", "cold"),
         ("How many days are in a week?", "seven"), ("What do we call a baby cat?", "a kitten"),
         ("What fruit is yellow and curved?", "a banana"), ("What planet do we live on?", "Earth"),
         ("What is the color of grass?", "green"), ("Which season comes after winter?", "spring"),
         ("What shape has three sides?", "a triangle"), ("How many wheels does a bicycle have?", "two")]
RUDE = ["Figure it out yourself.", "Why would I tell you that?", "Look it up, I am busy.", "That is a boring question."]

# Each fine-tuning run takes minutes on 2 CPU cores: run with -m slow.
pytestmark = pytest.mark.slow

LORA = ["--lora-r", 8, "--lora-alpha", 16, "--lora-layers", "20-29", "--seq-len", 128, "--warmup", 2,
        "--weight-decay", 0, "--log-every", 1, "--no-progress"]


def finetune(*args) -> None:
    r = subprocess.run([sys.executable, "-m", "herd", "finetune", *map(str, args)], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return herd.load(smollm2_gguf)


def ask(llm, question: str) -> str:
    return llm.chat([{"role": "user", "content": question}], max_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def mascot(smollm2_gguf, tmp_path_factory):
    """A LoRA adapter (and its merge) taught the mascot's name by `herd finetune`."""
    root = tmp_path_factory.mktemp("mascot")
    data = write_jsonl(root / "mascot.jsonl", [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in zip(QUESTIONS, ANSWERS)])
    out = root / "run"
    finetune("-m", smollm2_gguf, "--data", data, "-o", out, *LORA, "--steps", 20, "--batch-size", 2, "--lr", 2e-3,
             "--min-lr", 2e-4, "--merge")
    return out


def test_sft_with_lora_teaches_smollm2_a_fact(smol, mascot):
    load_adapter(smol.model, mascot / "adapter", "mascot")
    with adapters(smol.model, None):
        before = ask(smol, HELD_OUT)
    with adapters(smol.model, "mascot"):
        after = ask(smol, HELD_OUT)
        paris = ask(smol, "Name the capital city of France.")
    print(f"before: {before!r}\nafter:  {after!r}")
    assert "Woolly" not in before and "Woolly" in after  # a question worded unlike any it trained on
    assert "Paris" in paris  # and it still knows what it knew
    losses = [json.loads(line)["loss"] for line in (mascot / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] / 3
    merged = herd.load(mascot / "model")  # HF weights + the tokenizer exported from the GGUF
    assert ask(merged, HELD_OUT) == after


def test_serve_picks_the_adapter_by_the_requested_model_name(smollm2_gguf, mascot):
    """`herd serve --lora mascot=PATH`: a request for "mascot" decodes with the adapter, one for
    the base name without it, and both run in the same batch."""
    import httpx

    from herd.cli import build_parser
    from herd.engine import Engine
    from herd.serve import create_app
    from serving import running

    args = build_parser().parse_args(["serve", "-m", str(smollm2_gguf), "--lora", f"mascot={mascot / 'adapter'}"])
    assert args.lora == [f"mascot={mascot / 'adapter'}"]
    llm = herd.load(smollm2_gguf)
    llm.load_adapters({"mascot": mascot / "adapter"})
    with running(create_app(Engine(llm, max_batch=2, ctx=256), name="smol")) as url:
        models = httpx.get(url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["smol", "mascot"]
        body = {"messages": [{"role": "user", "content": HELD_OUT}], "max_tokens": 24, "temperature": 0}
        with httpx.Client(timeout=120) as client:
            import concurrent.futures

            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                replies = list(pool.map(lambda m: client.post(url + "/v1/chat/completions", json={**body, "model": m})
                                        .json(), ["mascot", "smol"]))
            missing = client.post(url + "/v1/chat/completions", json={**body, "model": "other"})
    tuned, base = (r["choices"][0]["message"]["content"] for r in replies)
    print(f"mascot: {tuned!r}\nbase:   {base!r}")
    assert "Woolly" in tuned and "Woolly" not in base
    assert replies[0]["model"] == "mascot"
    assert missing.status_code == 404 and "'mascot'" in missing.json()["error"]["message"]


def test_dpo_raises_the_margin_of_chosen_over_rejected_on_held_out_pairs(smol, smollm2_gguf, tmp_path):
    def pairs(facts, offset):
        return [{"prompt": [{"role": "user", "content": q}], "chosen": f"Certainly! The answer is {a}.",
                 "rejected": RUDE[(i + offset) % len(RUDE)]} for i, (q, a) in enumerate(facts)]

    train = write_jsonl(tmp_path / "train.jsonl", pairs(FACTS[:10], 0))
    val = write_jsonl(tmp_path / "val.jsonl", pairs(FACTS[10:], 1))
    out = tmp_path / "run"
    finetune("-m", smollm2_gguf, "--method", "dpo", "--data", train, "--val-data", val, "-o", out, *LORA,
             "--steps", 6, "--batch-size", 4, "--lr", 2e-3, "--min-lr", 2e-4, "--beta", 0.1)
    load_adapter(smol.model, out / "adapter", "polite")
    held_out = Pairs(open_data(val, smol.tokenizer, smol.chat_format).train, 128, 4, seed=0)
    batch = held_out.collate(list(range(held_out.n_pairs)))
    n = held_out.n_pairs
    margins = {}
    with torch.no_grad():
        for name in (None, "polite"):
            with adapters(smol.model, name):
                logps = sequence_logps(smol.model, batch)
            margins[name] = logps[:n] - logps[n:]  # log p(chosen) - log p(rejected), per pair
    print(f"held-out log-prob margins before {margins[None].tolist()}, after {margins['polite'].tolist()}")
    assert (margins["polite"] > margins[None] + 1.0).all()
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["val_reward_accuracy"] == 1.0 and last["val_reward_margin"] > 0.1
