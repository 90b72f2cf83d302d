"""`herd convert` from a GGUF carries the tokenizer: to Hugging Face files that transformers reads
(tokenizer.json, tokenizer_config.json with the chat template and the special and end tokens), to
another GGUF with the source's vocabulary metadata; the converted model generates the source's
greedy text. Through real `herd` processes, on the real SmolLM2-135M-Instruct Q4_1 file."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from herd.checkpoint import convert, read_gguf_metadata
from herd.tokenizer import load_tokenizer

STORE_NAME = "smollm2-135m-instruct"
QUESTION = "Name the capital city of France."


def herd(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "herd", *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ))


def greedy_chat(model: str, *extra: str) -> str:
    r = herd("generate", "-m", model, *extra, "--chat", "-t", "0", "-n", "24", QUESTION)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def hf_dir(smollm2_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("convert") / "hf"
    r = herd("convert", STORE_NAME, str(out), "--to", "hf")  # a store name, as every command takes
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def source_reply(smollm2_gguf):
    reply = greedy_chat(STORE_NAME)
    assert "Paris" in reply
    return reply


def test_gguf_to_hf_writes_the_tokenizer_files(hf_dir, smollm2_gguf):
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    md = read_gguf_metadata(smollm2_gguf)
    tokens = md["tokenizer.ggml.tokens"]
    assert config["chat_template"] == md["tokenizer.chat_template"]
    assert config["bos_token"] == tokens[md["tokenizer.ggml.bos_token_id"]] == "<|im_start|>"
    assert config["eos_token"] == tokens[md["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
    assert config["add_bos_token"] is False
    assert json.loads((hf_dir / "config.json").read_text())["eos_token_id"] == md["tokenizer.ggml.eos_token_id"]
    added = {t["content"]: t["special"] for t in json.loads((hf_dir / "tokenizer.json").read_text())["added_tokens"]}
    assert added["<|im_start|>"] and added["<|im_end|>"] and added["<|endoftext|>"]


def test_transformers_reads_the_converted_tokenizer_as_herd_reads_the_gguf(hf_dir, smollm2_llm):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ours = smollm2_llm.tokenizer
    for text in ["Hello world 12345", "  two  spaces\n\nand <|im_start|> a token", "Ünïcödé 😀 naïve", "x=1+2*3;"]:
        assert theirs.encode(text) == ours.encode(text, special=True), text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    ids = theirs.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == smollm2_llm.encode_chat(messages)
    assert theirs.eos_token == "<|im_end|>" and theirs.bos_token == "<|im_start|>"


def test_the_hf_conversion_generates_the_sources_greedy_text(hf_dir, source_reply):
    assert greedy_chat(str(hf_dir)) == source_reply


@pytest.mark.slow
def test_transformers_generates_the_sources_greedy_text_from_the_hf_conversion(hf_dir, smollm2_llm):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id)
    theirs = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    ours = smollm2_llm.chat([{"role": "user", "content": QUESTION}], max_tokens=24, temperature=0.0)
    assert theirs == ours and "Paris" in ours


def test_gguf_to_gguf_of_the_same_type_is_lossless_and_keeps_the_vocabulary(smollm2_gguf, smollm2_llm, tmp_path):
    import herd as herd_api

    out = tmp_path / "copy.gguf"
    r = herd("convert", STORE_NAME, str(out), "--to", "gguf", "--type", "q4_1")
    assert r.returncode == 0, r.stderr
    gguf = pytest.importorskip("gguf")
    source, copy = gguf.GGUFReader(smollm2_gguf), gguf.GGUFReader(out)
    theirs = {t.name: (t.tensor_type, bytes(t.data)) for t in source.tensors}
    assert {t.name: (t.tensor_type, bytes(t.data)) for t in copy.tensors} == theirs  # Q4_1 requantized bit for bit
    before, after = read_gguf_metadata(smollm2_gguf), read_gguf_metadata(out)
    assert {k: v for k, v in after.items() if k.startswith("tokenizer.")} == \
        {k: v for k, v in before.items() if k.startswith("tokenizer.")}
    messages = [{"role": "user", "content": QUESTION}]
    assert herd_api.load(out).chat(messages, max_tokens=24, temperature=0.0) == \
        smollm2_llm.chat(messages, max_tokens=24, temperature=0.0)


def test_a_gguf_or_a_store_name_serves_as_tokenizer(hf_dir, smollm2_gguf, smollm2_llm, source_reply, tmp_path):
    import herd as herd_api

    bare = tmp_path / "bare"
    shutil.copytree(hf_dir, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    assert greedy_chat(str(bare), "--tokenizer", str(smollm2_gguf)) == source_reply
    text = "<|im_start|>user\nHi there, 42 llamas<|im_end|>"
    assert herd_api.load(bare, tokenizer=STORE_NAME).tokenizer.encode(text, special=True) == \
        smollm2_llm.tokenizer.encode(text, special=True)


def test_a_gguf_named_as_a_tokenizer_file_is_refused_without_internal_names(smollm2_gguf):
    with pytest.raises(Exception, match="GGUF model file") as e:
        load_tokenizer(smollm2_gguf)
    assert "tokenizer_from_gguf" not in str(e.value)


def test_a_sentencepiece_gguf_converts_with_its_tokenizer_model(shared, tmp_path):
    import herd

    source = shared("models", "stories260K", "stories260K.gguf")
    out = convert(source, tmp_path / "hf", to="hf")
    assert (out / "tokenizer.model").is_file() and (out / "tokenizer_config.json").is_file()
    a, b = herd.load(source), herd.load(out)
    assert b.tokenizer.encode("Once upon a time, Lily") == a.tokenizer.encode("Once upon a time, Lily")
    assert b.generate("Once upon a time", max_tokens=40, temperature=0.0) == \
        a.generate("Once upon a time", max_tokens=40, temperature=0.0)
