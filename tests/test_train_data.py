"""Training data: the trained tokenizer, prepared corpora (tokens exactly the tokenizer's, masks
exactly the assistant turns of the real Llama 3.1 chat template), and packed batches whose
documents cannot see each other."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import spread_init, tiny_config

from herd.errors import HerdError
from herd.model import Transformer
from herd.tokenizer import JinjaChat, Llama2Chat, load_tokenizer
from herd.train.data import IGNORE, Packed, Pairs, Windows, load_corpus, open_data, prepare_data, unigram_loss
from herd.train.vocab import train_tokenizer


@pytest.fixture(scope="module")
def story_tok(tmp_path_factory):
    """A 512-piece tokenizer trained on the TinyStories subset."""
    from herd.shared import shared_path

    corpus = shared_path("corpora", "tinystories_valid_subset_794KB.txt")
    if not corpus.exists():
        pytest.skip(f"reference file {corpus} is absent")
    return train_tokenizer([corpus], tmp_path_factory.mktemp("tok"), vocab_size=512)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_trained_tokenizer_round_trips_any_text_through_bytes(story_tok, tmp_path):
    assert story_tok.vocab_size == 512 and story_tok.bos_id == 1 and story_tok.eos_id == 2
    text = "Once upon a time, Lily saw 2024 birds 🐦 — über naïve."
    ids = story_tok.encode(text)
    assert story_tok.decode(ids) == text
    assert {story_tok.decode([i]) for i in story_tok.encode("2024")} - {""} == {"2", "0", "4"}  # digits split
    assert len(story_tok.encode("Once upon a time")) <= 6  # merges learned from the stories
    again = load_tokenizer(story_tok.save(tmp_path / "copy"))
    assert again.encode(text) == ids and again.add_bos


def test_train_tokenizer_errors(tmp_path):
    with pytest.raises(HerdError, match="too small"):
        train_tokenizer([tmp_path], tmp_path / "t", vocab_size=100)
    with pytest.raises(HerdError, match="no such file"):
        train_tokenizer([tmp_path / "none.txt"], tmp_path / "t", vocab_size=512)


def test_text_corpus_is_the_tokenizers_ids_joined_with_bos_and_eos(story_tok, tmp_path):
    docs = ["Tom had a red ball.", "The cat sat on the mat.", "A dog ran fast.", "Sue and Max played."]
    (tmp_path / "a.txt").write_text("\n===\n".join(docs[:3]))
    write_jsonl(tmp_path / "b.jsonl", [{"text": docs[3]}])
    corpus = prepare_data([tmp_path / "a.txt", tmp_path / "b.jsonl"], tmp_path / "data", story_tok,
                          val_fraction=0.25, separator="\n===\n", progress=False)
    expected = [[1, *story_tok.encode(d), 2] for d in docs]
    assert corpus.kind == "text" and corpus.train.n_docs == 3 and corpus.val.n_docs == 1
    assert [list(corpus.train.doc(i)[0]) for i in range(3)] == expected[:3]
    assert list(corpus.val.doc(0)[0]) == expected[3] and corpus.train.doc(0)[1] is None
    reread = load_corpus(tmp_path / "data")
    assert reread.fingerprint() == corpus.fingerprint()
    assert load_tokenizer(reread.tokenizer_dir).encode(docs[0]) == story_tok.encode(docs[0])


def test_one_document_is_split_at_the_end_of_its_tokens(story_tok, tmp_path):
    (tmp_path / "a.txt").write_text("Once upon a time there was a girl. " * 40)
    corpus = prepare_data([tmp_path / "a.txt"], tmp_path / "d", story_tok, val_fraction=0.1, progress=False)
    n = corpus.train.n_tokens + corpus.val.n_tokens
    assert corpus.val.n_tokens == int(0.1 * n)
    assert np.array_equal(np.concatenate([corpus.train.stream(), corpus.val.stream()]),
                          [1, *story_tok.encode("Once upon a time there was a girl. " * 40), 2])


def test_unigram_loss_is_the_cross_entropy_of_smoothed_frequencies():
    train, val = np.array([0, 0, 1, 2]), np.array([0, 3])
    p = np.array([3, 2, 2, 1]) / 8  # counts + 1
    assert unigram_loss(train, val, 4) == pytest.approx(-(np.log(p[0]) + np.log(p[3])) / 2)


def test_chat_loss_mask_covers_exactly_the_assistant_turns_of_the_llama31_template(llama3, shared, tmp_path):
    template = shared("chat_templates", "meta-llama-Llama-3.1-8B-Instruct.jinja").read_text()
    fmt = JinjaChat(template, "<|begin_of_text|>", "<|eot_id|>")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    corpus = open_data(write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]), llama3, fmt)
    ids, mask = corpus.train.doc(0)
    assert list(ids) == fmt.encode(llama3, messages, add_generation_prompt=False)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))  # starts and ends of the 1-runs
    learned = [llama3.decode(ids[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2])]
    assert learned == ["Hello.<|eot_id|>", "4<|eot_id|>"]


def test_prompt_completion_and_preference_records(story_tok, tmp_path):
    sft = open_data(write_jsonl(tmp_path / "s.jsonl", [{"prompt": "Q: hi", "completion": " A: yo"}]), story_tok, None)
    ids, mask = sft.train.doc(0)
    p = [1, *story_tok.encode("Q: hi")]
    assert sft.kind == "sft" and list(ids) == p + story_tok.encode(" A: yo") + [2]
    assert list(mask) == [0] * len(p) + [1] * (len(ids) - len(p))

    pairs = [{"prompt": f"Q{i}", "chosen": "good", "rejected": "bad answer"} for i in range(10)]
    pref = prepare_data([write_jsonl(tmp_path / "p.jsonl", pairs)], tmp_path / "pd", story_tok, val_fraction=0.2,
                        progress=False)
    assert pref.kind == "preference" and pref.train.n_docs == 16 and pref.val.n_docs == 4  # pairs kept whole
    batch = Pairs(pref.val, 32, 2, seed=0).collate([0, 1])
    chosen, rejected = batch["targets"][0], batch["targets"][2]
    assert story_tok.decode(chosen[chosen != IGNORE].tolist()).startswith("good")
    assert story_tok.decode(rejected[rejected != IGNORE].tolist()).startswith("bad answer")


@pytest.mark.parametrize("records,match", [
    ([{"txt": "a"}], "a record needs"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "no assistant message"),
    ([{"messages": "hi"}], "must be a non-empty list"),
    ([{"prompt": "a", "chosen": "b"}], "needs 'prompt', 'chosen' and 'rejected'"),
    ([{"text": "a"}, {"prompt": "a", "chosen": "b", "rejected": "c"}], "cannot be mixed"),
])
def test_bad_records_are_one_line_errors(story_tok, tmp_path, records, match):
    with pytest.raises(HerdError, match=match):
        open_data(write_jsonl(tmp_path / "x.jsonl", records), story_tok, Llama2Chat())


def test_chat_records_need_a_chat_format(story_tok, tmp_path):
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    with pytest.raises(HerdError, match=r"x.jsonl:1: chat messages need a model with a chat format"):
        open_data(write_jsonl(tmp_path / "x.jsonl", [record]), story_tok, None)


def test_corpus_errors(story_tok, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(HerdError, match=r"bad.jsonl:2: invalid JSON"):
        prepare_data([tmp_path / "bad.jsonl"], tmp_path / "o1", story_tok, progress=False)
    with pytest.raises(HerdError, match="not a prepared corpus"):
        load_corpus(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(HerdError, match="not an empty directory"):
        prepare_data([tmp_path / "bad.jsonl"], tmp_path / "full", story_tok, progress=False)


def test_batches_depend_only_on_seed_and_step(story_tok, tmp_path):
    (tmp_path / "a.txt").write_text("The sun is warm. " * 200)
    corpus = prepare_data([tmp_path / "a.txt"], tmp_path / "d", story_tok, progress=False)
    a, b = Windows(corpus.train, 16, 4, seed=7), Windows(corpus.train, 16, 4, seed=7)
    assert a.step_examples(5) == b.step_examples(5) != a.step_examples(6)
    batch = a.collate(a.step_examples(5))
    assert torch.equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])


def test_packed_rows_restart_positions_and_epochs_reshuffle(story_tok, tmp_path):
    records = [{"prompt": f"Question {i}?", "completion": " Answer." * (1 + i % 3)} for i in range(9)]
    corpus = open_data(write_jsonl(tmp_path / "s.jsonl", records), story_tok, None)
    packed = Packed(corpus.train, 32, 2, seed=0)
    rows = [r for step in range(12) for r in packed.step_examples(step)]
    epoch0 = sum(len(r) for r in packed._plan(0))
    assert epoch0 == 9 and sorted(d for r in packed._plan(1) for d in r) == list(range(9))
    assert packed._plan(0) != packed._plan(1)
    batch = packed.collate(rows[:2])
    for r in range(2):
        starts = (batch["input_pos"][r] == 0).nonzero().flatten().tolist()
        assert len([s for s in starts if batch["doc_ids"][r, s] >= 0]) == len(rows[r])


def test_packed_documents_do_not_see_each_other(story_tok, tmp_path):
    """The logits of each document inside a packed row equal its logits computed alone."""
    records = [{"text": t} for t in ("The cat sat.", "A big dog ran to the park.", "Sun!")]
    corpus = open_data(write_jsonl(tmp_path / "t.jsonl", records), story_tok, None)
    torch.manual_seed(0)
    model = spread_init(Transformer(tiny_config("llama3", vocab_size=story_tok.vocab_size))).eval()
    packed = Packed(corpus.train, 40, 1, seed=0)
    (row,) = packed.eval_examples(1)
    assert len(row) == 3
    batch = packed.collate([row])
    with torch.no_grad():
        together = model(batch["tokens"], input_pos=batch["input_pos"], doc_ids=batch["doc_ids"])
        leaky = model(batch["tokens"])
        at = 0
        for d in row:
            alone = torch.as_tensor(np.asarray(corpus.train.doc(d)[0][:-1], dtype=np.int64))[None]
            n = alone.shape[1]
            assert torch.allclose(together[0, at : at + n], model(alone)[0], atol=1e-5)
            if at:
                assert not torch.allclose(leaky[0, at : at + n], model(alone)[0], atol=1e-3)
            at += n
