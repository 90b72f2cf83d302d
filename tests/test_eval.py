"""Evaluation: sliding-window perplexity and multiple-choice scoring against transformers on the
real stories260K model, the TinyStories validation measurement, and lm-evaluation-harness running
local tasks end to end on a herd model, offline."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import herd
from herd.checkpoint import save_hf
from herd.errors import HerdError
from herd.eval import multiple_choice, perplexity, read_items
from herd.eval.perplexity import windows

ITEMS = [
    {"question": "Once upon a time, there was a little", "choices": ["girl", "volcano", "spreadsheet"], "answer": 0},
    {"question": "Lily went to the park with her", "choices": ["mom", "tax return", "telescope"], "answer": 0},
    {"question": "Tom liked to eat", "choices": ["candy", "rocks", "invoices"], "answer": "candy"},
    {"question": "The sun was", "choices": ["shining", "arguing", "purple"], "answer": 0},
    {"question": "The cat sat on the", "choices": ["ground", "equation", "decision"], "answer": 0},
    {"question": "One day, a big dog named Max", "choices": ["saw a ball", "filed a patent"], "answer": 0},
    {"question": "She was very", "choices": ["happy", "ambidextrous", "fiscal"], "answer": 1},
    {"question": "They played together all", "choices": ["day", "quarterly"], "answer": 0},
]


@pytest.fixture(scope="module")
def stories():
    from conftest import require_shared

    return herd.load(require_shared("models", "stories260K", "stories260K.bin"))


@pytest.fixture(scope="module")
def stories_hf(stories, tmp_path_factory):
    """The same weights as a transformers LlamaForCausalLM: the independent reference."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("stories_hf")
    save_hf(stories.config, stories.model.state_dict(), path)
    return transformers.LlamaForCausalLM.from_pretrained(path).eval()


def valid_text(shared, chars: int | None = None) -> str:
    text = shared("corpora", "tinystories_valid_subset_794KB.txt").read_text(encoding="utf-8")
    return text if chars is None else text[:chars]


def test_windows_predict_every_token_once():
    for n, context, stride in [(10, 4, 4), (10, 4, 1), (1000, 128, 48), (5, 512, 256), (513, 512, 512)]:
        predicted = []
        for start, end, scored in windows(n, context, stride):
            first = end - scored + 1  # the first new id, predicted from ids[start:first]
            assert end - start <= context
            assert start == 0 or first - start >= context - stride + 1  # history kept from the previous window
            predicted += range(first, end + 1)
        assert predicted == list(range(1, n))
    with pytest.raises(HerdError, match="stride"):
        windows(10, 4, 5)


def test_perplexity_matches_transformers(stories, stories_hf, shared):
    ids = stories.tokenizer.encode(valid_text(shared, 3000), bos=True)
    context, stride = 128, 48
    got = perplexity(stories.model, ids, context, stride, batch_size=4)
    nll = 0.0
    with torch.no_grad():
        for start, end, scored in windows(len(ids), context, stride):
            window = torch.tensor([ids[start:end + 1]])
            labels = window.clone()
            labels[0, : window.shape[1] - scored] = -100  # only the new tokens
            loss = stories_hf(window, labels=labels).loss  # mean over the scored tokens
            nll += float(loss) * scored
    assert got.tokens == len(ids) - 1
    assert got.nll == pytest.approx(nll, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)


def test_stories260k_on_tinystories_valid_start(stories, shared):
    # the first 40,000 characters (about 20,000 tokens); the whole subset is the slow test below
    text = valid_text(shared, 40_000)
    r = perplexity(stories.model, stories.tokenizer.encode(text, bos=True), 512, 512, batch_size=8,
                   n_bytes=len(text.encode()))
    assert 1.2 < r.nats_per_token < 1.6, r.nats_per_token
    assert r.bits_per_byte == pytest.approx(r.nll / math.log(2) / len(text.encode()))


@pytest.mark.slow
def test_stories260k_on_tinystories_valid_subset(stories, shared):
    # llama2.c publishes 1.297 nats/token on its own validation shard; measured here on the
    # 794 KB subset: 1.619 with disjoint 512-token windows, 1.604 with stride 256.
    text = valid_text(shared)
    r = perplexity(stories.model, stories.tokenizer.encode(text, bos=True), 512, 512, batch_size=16)
    assert r.nats_per_token == pytest.approx(1.619, abs=0.01)


@pytest.mark.slow
def test_the_model_is_calibrated_to_its_published_loss(stories):
    # The cross-entropy of a well-trained model on its own samples (temperature 1) is its
    # entropy, which is where its validation loss sits: llama2.c publishes 1.297 for stories260K.
    from herd.generate import SamplingParams, Sequence, run_batch

    seqs = [Sequence([1], SamplingParams(max_tokens=256, temperature=1.0, seed=s), None, set(), 512, limit=256)
            for s in range(6)]
    for _ in run_batch(stories.model, seqs):
        pass
    nll = tokens = 0
    for s in seqs:
        r = perplexity(stories.model, [1, *s.output_ids], 512, 512)
        nll, tokens = nll + r.nll, tokens + r.tokens
    assert nll / tokens == pytest.approx(1.30, abs=0.08)


def test_multiple_choice_matches_transformers(stories, stories_hf, tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    items = read_items(path)
    result = multiple_choice(stories.model, stories.tokenizer, items, batch_size=5)
    # reference: every choice's log-likelihood from transformers, the continuation " choice",
    # all sequences in one right-padded batch
    tok = stories.tokenizer
    seqs = [(tok.encode(it.question, bos=True), tok.encode(it.question + " " + c, bos=True), it, j)
            for it in items for j, c in enumerate(it.choices)]
    width = max(len(whole) for _, whole, _, _ in seqs)
    batch = torch.tensor([whole + [0] * (width - len(whole)) for _, whole, _, _ in seqs])
    with torch.no_grad():
        logp = torch.log_softmax(stories_hf(batch).logits, -1)
    lps: dict[int, list[float]] = {}
    for row, (context, whole, item, _) in enumerate(seqs):
        lps.setdefault(id(item), []).append(
            sum(float(logp[row, i - 1, whole[i]]) for i in range(len(context), len(whole))))
    picks, picks_norm = [], []
    for item in items:
        lp = lps[id(item)]
        picks.append(max(range(len(lp)), key=lp.__getitem__))
        picks_norm.append(max(range(len(lp)), key=lambda j: lp[j] / len(item.choices[j])))
    assert (result.picks, result.picks_norm) == (picks, picks_norm)
    assert result.n == 8 and result.acc == sum(p == it.answer for p, it in zip(picks, items)) / 8
    assert result.acc >= 6 / 8  # the sensible endings win (the 7th item's answer is the odd word on purpose)


def test_read_items_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    for line, match in [("{", "not JSON"), ("[1]", "JSON object"), ('{"question": "q", "choices": ["a"], "answer": 0}',
                         "at least two"), ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "index of a choice"),
                        ('{"choices": ["a", "b"], "answer": 0}', "question")]:
        path.write_text(line + "\n")
        with pytest.raises(HerdError, match=match):
            read_items(path)
    path.write_text("\n")
    with pytest.raises(HerdError, match="no items"):
        read_items(path)


def test_cli_eval(shared, tmp_path):
    from test_cli import herd as run_herd

    model = str(shared("models", "stories260K", "stories260K.bin"))
    text = tmp_path / "text.txt"
    text.write_text(valid_text(shared, 2000))
    r = run_herd("eval", "perplexity", str(text), "-m", model, "--context", "128", "--stride", "64")
    assert r.returncode == 0, r.stderr
    llm = herd.load(model)
    expected = perplexity(llm.model, llm.tokenizer.encode(text.read_text(), bos=True), 128, 64)
    assert f"tokens {expected.tokens}  nats/token {expected.nats_per_token:.4f}" in r.stdout
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    r = run_herd("eval", "choice", str(items), "-m", model)
    choice = multiple_choice(llm.model, llm.tokenizer, read_items(items))
    assert r.returncode == 0 and f"items 8  acc {choice.acc:.4f}  acc_norm {choice.acc_norm:.4f}" in r.stdout


TASKS = {
    "herd_cloze": """task: herd_cloze
dataset_path: json
dataset_kwargs:
  data_files: {{test: {items}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "herd_ppl": """task: herd_ppl
dataset_path: json
dataset_kwargs:
  data_files: {{test: {docs}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: "{{{{text}}}}"
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
""",
    "herd_gen": """task: herd_gen
dataset_path: json
dataset_kwargs:
  data_files: {{test: {items}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[0]}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def test_lm_eval_runs_local_tasks_end_to_end(stories, shared, tmp_path):
    pytest.importorskip("lm_eval")
    items = [dict(item, answer=item["choices"].index(item["answer"]) if isinstance(item["answer"], str)
                  else item["answer"]) for item in ITEMS]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    paragraphs = [p for p in valid_text(shared, 5000).split("\n\n") if p.strip()][:4]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, yaml in TASKS.items():
        (tasks / f"{name}.yaml").write_text(yaml.format(items=tmp_path / "items.jsonl", docs=tmp_path / "docs.jsonl"))
    model = shared("models", "stories260K", "stories260K.bin")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache"),
           "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-m", "herd.eval.lm_eval_backend", "--model", "herd",
                        "--model_args", f"pretrained={model}", "--tasks", "herd_cloze", "herd_ppl", "herd_gen",
                        "--include_path", str(tasks), "--output_path", str(tmp_path / "out"), "--log_samples",
                        "--batch_size", "4"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]

    choice = multiple_choice(stories.model, stories.tokenizer, read_items(tmp_path / "items.jsonl"))
    assert results["herd_cloze"]["acc,none"] == pytest.approx(choice.acc)
    assert results["herd_cloze"]["acc_norm,none"] == pytest.approx(choice.acc_norm)

    # lm-eval's rolling windows are herd's disjoint windows after BOS
    nll = n_bytes = 0
    for p in paragraphs:
        r = perplexity(stories.model, stories.tokenizer.encode(p, bos=True), 512, 512)
        nll, n_bytes = nll + r.nll, n_bytes + len(p.encode())
    assert results["herd_ppl"]["bits_per_byte,none"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-4)

    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_herd_gen_*.jsonl")).open()]
    expected = stories.generate([item["question"] for item in items], max_tokens=12, temperature=0, stop=["."])
    assert sorted(s["resps"][0][0] for s in samples) == sorted(expected)
    assert results["herd_gen"]["exact_match,none"] == pytest.approx(
        sum(e == item["choices"][0] for e, item in zip(expected, items)) / len(items))


def test_cli_perplexity_shows_progress_and_takes_max_tokens(shared, tmp_path):
    from test_cli import herd as run_herd

    model = str(shared("models", "stories260K", "stories260K.bin"))
    text = tmp_path / "text.txt"
    text.write_text(valid_text(shared, 2000))
    r = run_herd("eval", "perplexity", str(text), "-m", model, "--context", "64", "--stride", "32",
                 "--max-tokens", "300", "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    llm = herd.load(model)
    ids = llm.tokenizer.encode(text.read_text(), bos=True)
    assert len(ids) > 300
    expected = perplexity(llm.model, ids[:300], 64, 32)
    assert f"tokens 299  nats/token {expected.nats_per_token:.4f}" in r.stdout
    assert "perplexity: 100%" in r.stderr and "window" in r.stderr  # tqdm's bar, on stderr
