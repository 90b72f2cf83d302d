"""Constrained JSON decoding from the Python API, and the token bytes it matches against."""

import json

import jsonschema
import pytest

import herd
from herd.errors import HerdError

TEXTS = ["Hello world", '  déjà vu 😀 {"a": [1, 2.5e-3]}\n\ttab', "x"]


@pytest.mark.parametrize("name", ["llama2", "llama3", "llama3_hf", "llama4"])
def test_token_bytes_spell_every_encoding(name, request):
    tok = request.getfixturevalue(name)
    table = tok.token_bytes()
    assert len(table) == tok.vocab_size
    for text in TEXTS:
        joined = b"".join(table[i] for i in tok.encode(text))
        # SentencePiece adds its dummy-prefix space in front of the text
        assert joined == (" " + text if name == "llama2" else text).encode()


def test_smollm2_token_bytes(smollm2_llm):
    tok = smollm2_llm.tokenizer
    table = tok.token_bytes()
    for text in TEXTS:
        assert b"".join(table[i] for i in tok.encode(text)) == text.encode()
    assert table[tok.token_id("<|im_end|>")] == b"<|im_end|>"


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "friends": {"type": "array", "maxItems": 3,
                                                       "items": {"type": "integer", "minimum": 0, "maximum": 99}},
                                           "happy": {"type": "boolean"}},
          "required": ["name", "friends", "happy"], "additionalProperties": False}


def test_generate_follows_a_json_schema(shared):
    llm = herd.load(shared("models", "stories260K", "stories260K.gguf"))  # a story model, no JSON in training
    for seed in range(3):
        text = llm.generate("Once upon a time", json_schema=SCHEMA, max_tokens=200, temperature=1.0, seed=seed)
        jsonschema.validate(json.loads(text), SCHEMA)
    with pytest.raises(HerdError, match="json_schema is not a valid JSON schema at properties/name/type"):
        llm.generate("Once", json_schema={"properties": {"name": {"type": "text"}}})
