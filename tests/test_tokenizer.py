"""Tokenizer back ends against the real tokenizer files and llama.cpp's / Meta's published ids."""

from __future__ import annotations

import random

import pytest

from herd.errors import HerdError
from herd.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    StreamDecoder,
    TiktokenTokenizer,
    load_tokenizer,
)
from herd.tokenizer.stream import MAX_PENDING


def read_vectors(shared, kind: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's test strings and their ids; kind "spm" (Llama 2) or "bpe" (Llama 3). Each
    string is followed by a separator line; the files hold 46 strings (one of them empty)."""
    base = f"ggml-vocab-llama-{kind}.gguf"
    # bytes, not read_text: universal newlines would turn "\r" in a test string into "\n"
    inp = shared("tokenizer_vectors", base + ".inp").read_bytes().decode("utf-8")
    out = shared("tokenizer_vectors", base + ".out").read_bytes().decode("utf-8")
    texts = inp.split("\n__ggml_vocab_test__\n")
    assert texts.pop() == ""
    ids = [[int(x) for x in line.split()] for line in out.split("\n")]
    assert ids.pop() == []
    assert len(texts) == len(ids) == 46
    return list(zip(texts, ids))


def test_kinds_detected_from_content(llama2, llama3, llama3_hf, llama4):
    assert isinstance(llama2, SentencePieceTokenizer)
    assert isinstance(llama3, TiktokenTokenizer) and llama3.name == "llama3"
    assert isinstance(llama3_hf, HFTokenizer)
    assert isinstance(llama4, TiktokenTokenizer) and llama4.name == "llama4"


@pytest.mark.parametrize("name, kind", [("llama2", "spm"), ("llama3", "bpe"), ("llama3_hf", "bpe")])
def test_llama_cpp_vectors(request, shared, name, kind):
    tok = request.getfixturevalue(name)
    for text, ids in read_vectors(shared, kind):
        assert tok.encode(text) == ids, text
        # All 47 round-trip: tiktoken and byte-level BPE are lossless, and Llama 2's model
        # neither normalizes nor collapses whitespace (its decode drops only the dummy prefix).
        assert tok.decode(ids) == text, text


def test_tiktoken_and_hf_agree(shared, llama3, llama3_hf):
    extra = [
        "<|eot_id|> typed by a user",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
        "x" * 3000 + " " * 3000 + "\t\n" * 50,
        "def f(x):\n\treturn x ** 2  # square\n",
    ]
    for text in [t for t, _ in read_vectors(shared, "bpe")] + extra:
        for special in (False, True):
            assert llama3.encode(text, special=special) == llama3_hf.encode(text, special=special), text


def test_meta_llama3_vectors(llama3, llama3_hf):
    # Meta's own test: encode("This is a test sentence.", bos=True, eos=True)
    for tok in (llama3, llama3_hf):
        assert tok.encode("This is a test sentence.", bos=True, eos=True) == [
            128000, 2028, 374, 264, 1296, 11914, 13, 128001,
        ]
    assert llama3.bos_id == 128000 and llama3.eos_id == 128001
    assert llama3.eos_ids == {128001, 128008, 128009}
    assert llama3.vocab_size == 128256
    for text, i in [("<|start_header_id|>", 128006), ("<|end_header_id|>", 128007), ("<|eom_id|>", 128008),
                    ("<|eot_id|>", 128009), ("<|python_tag|>", 128010), ("<|reserved_special_token_245|>", 128255)]:
        assert llama3.token_id(text) == i
    # the Meta-Llama-3 HF release still calls 128008 a reserved token, so it is no end token there
    assert llama3_hf.eos_ids == {128001, 128009}


def test_special_strings_are_text_unless_asked(llama2, llama3, llama3_hf):
    for tok in (llama3, llama3_hf):
        plain = tok.encode("hi<|eot_id|>")
        assert 128009 not in plain and tok.decode(plain) == "hi<|eot_id|>"
        assert tok.encode("hi<|eot_id|>", special=True) == [plain[0], 128009]
        assert tok.decode([128000, 6151, 128009]) == "<|begin_of_text|>hi<|eot_id|>"
    assert 2 not in llama2.encode("</s>")
    # as Meta's Llama 2 chat code encodes turns: each text run gets its own dummy prefix
    sp_hello = llama2.encode("Hello")
    assert llama2.encode("<s>Hello</s><s>Hello", special=True) == [1, *sp_hello, 2, 1, *sp_hello]
    assert llama2.decode([1, *sp_hello, 2]) == "<s>Hello</s>"


def test_llama4(shared, llama4):
    assert llama4.vocab_size == 202048
    # ids as Meta's llama-models lays them out (HF's Llama 4 config uses the same ones:
    # boi 200080, eoi 200081, image token 200092 = <|patch|>)
    expected = {
        "<|begin_of_text|>": 200000, "<|end_of_text|>": 200001, "<|fim_prefix|>": 200002,
        "<|header_start|>": 200005, "<|header_end|>": 200006, "<|eom|>": 200007, "<|eot|>": 200008,
        "<|step|>": 200009, "<|python_start|>": 200016, "<|python_end|>": 200017,
        "<|finetune_right_pad|>": 200018, "<|image_start|>": 200080, "<|image_end|>": 200081,
        "<|image|>": 200090, "<|patch|>": 200092, "<|reasoning_thinking_start|>": 201142,
        "<|reasoning_thinking_end|>": 201143, "<|reserved_special_token_0|>": 201144,
    }
    for text, i in expected.items():
        assert llama4.token_id(text) == i, text
    assert len(llama4.special_tokens) == 2048
    assert llama4.bos_id == 200000 and llama4.eos_ids == {200001, 200007, 200008}
    for text, _ in read_vectors(shared, "bpe"):
        ids = llama4.encode(text)
        assert llama4.decode(ids) == text
        assert all(i < 200000 for i in ids)
    assert llama4.encode("<|eot|>", special=True) == [200008]
    assert 200008 not in llama4.encode("<|eot|>")


def test_long_runs_are_cut_like_meta(llama3):
    # Meta cuts runs of >25,000 (non-)whitespace characters before BPE; the cut shows in the ids.
    text = "a" * 25_001
    assert llama3.encode(text) == llama3.encode("a" * 25_000) + llama3.encode("a")
    assert llama3.decode(llama3.encode(text)) == text


def test_directory_config(llama3_hf):
    assert llama3_hf.chat_template and "<|start_header_id|>" in llama3_hf.chat_template
    assert llama3_hf.bos_id == 128000 and llama3_hf.eos_id == 128001
    # this release's tokenizer.json post-processor adds no BOS, and its config sets no flag
    assert llama3_hf.add_bos is False


# --- bad input -----------------------------------------------------------------------------


def _error(path) -> str:
    with pytest.raises(HerdError) as e:
        load_tokenizer(path)
    message = str(e.value)
    assert str(path) in message and "\n" not in message
    return message


def test_missing_and_garbage_files(tmp_path):
    assert "no such" in _error(tmp_path / "absent.model")
    assert "no tokenizer.json or tokenizer.model" in _error(tmp_path)
    (tmp_path / "empty.model").write_bytes(b"")
    assert "empty" in _error(tmp_path / "empty.model")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(random.Random(0).randbytes(5000))
    assert "not a tokenizer file" in _error(garbage)
    (tmp_path / "bad.json").write_text('{"version": "1.0", "model": 3}')
    assert "tokenizer.json" in _error(tmp_path / "bad.json")
    (tmp_path / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    assert "GGUF" in _error(tmp_path / "model.gguf")


def test_truncated_files(shared, tmp_path):
    for parts, name in [
        (("tokenizers", "llama2", "tokenizer.model"), "tokenizer.model"),
        (("tokenizers", "llama3", "tokenizer.model"), "tokenizer.model"),
        (("tokenizers", "llama3-hf", "tokenizer.json"), "tokenizer.json"),
    ]:
        data = shared(*parts).read_bytes()
        for cut in (len(data) // 2, len(data) - 7):
            path = tmp_path / f"cut{cut}" / name
            path.parent.mkdir()
            path.write_bytes(data[:cut])
            _error(path)
    # cut exactly at a line end: every line is valid, but ranks are missing
    lines = shared("tokenizers", "llama3", "tokenizer.model").read_bytes().splitlines(keepends=True)
    path = tmp_path / "short.model"
    path.write_bytes(b"".join(lines[:1000]))
    assert "1000 BPE ranks" in _error(path)


def test_decode_rejects_ids_outside_vocabulary(llama2, llama3):
    for tok in (llama2, llama3):
        with pytest.raises(HerdError, match="outside the vocabulary"):
            tok.decode([5, tok.vocab_size])


# --- streaming -----------------------------------------------------------------------------

STREAM_TEXTS = [
    "Héllo wörld, ça va? Ångström naïve café",
    "我想在apple工作1314151天～ こんにちは、世界！ 안녕하세요",
    "emoji 🦙🚀 😶\u200d🌫️ 👩🏽\u200d💻 ✅ family 👨\u200d👩\u200d👧",
    "  leading spaces\n\n\ttabs and   runs   ",
    "нещо на Български ½ ∑ ∞",
]


class _CountingTokenizer:
    """Records how many ids each decode call gets, to show the decoder's window stays small."""

    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    def decode(self, ids):
        self.longest = max(self.longest, len(ids))
        return self.tok.decode(ids)


def _stream(tok, ids):
    counting = _CountingTokenizer(tok)
    decoder = StreamDecoder(counting)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    return pieces, counting.longest


@pytest.mark.parametrize("name", ["llama2", "llama3", "llama3_hf", "llama4"])
def test_stream_decoder(request, name):
    tok = request.getfixturevalue(name)
    for text in STREAM_TEXTS:
        for ids in (tok.encode(text), tok.encode(text, bos=True, eos=True)):
            pieces, longest = _stream(tok, ids)
            assert "".join(pieces) == tok.decode(ids)
            assert not any("\ufffd" in p for p in pieces), pieces
            assert longest <= 5  # last shown token + at most 4 pending
    # arbitrary ids, invalid UTF-8 included: the concatenation is still exactly decode(all)
    rng = random.Random(1)
    ids = [rng.randrange(tok.vocab_size) for _ in range(400)]
    pieces, longest = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert longest <= MAX_PENDING + 1


def test_stream_holds_back_half_characters(llama2):
    ids = llama2.encode("a 😁")  # the emoji is four byte-fallback tokens
    decoder = StreamDecoder(llama2)
    pieces = [decoder.push(i) for i in ids]
    assert pieces[-4:-1] == ["", "", ""] and pieces[-1] == "😁"
    assert "".join(pieces) + decoder.flush() == "a 😁"
