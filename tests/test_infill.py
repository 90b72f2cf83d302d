"""Code Llama infilling: the published prompt format byte for byte, token ids as Meta's
`infilling_prompt_tokens` builds them, and generation that ends at <EOT>."""

from __future__ import annotations

import pytest
import torch
from sentencepiece import sentencepiece_model_pb2 as pb

from conftest import require_shared
from helpers import spread_init, tiny_config
from herd.errors import HerdError
from herd.llm import LLM
from herd.model import Transformer
from herd.tokenizer import SentencePieceTokenizer
from herd.tokenizer.infill import infill_ids, infill_prompt, infill_stop_ids

PREFIX = 'def remove_non_ascii(s: str) -> str:\n    """ '
SUFFIX = "\n    return result\n"


@pytest.fixture(scope="module", params=["normal", "control"])
def codellama(request):
    """Llama 2's SentencePiece model grown to Code Llama's 32,016 pieces, with its infilling
    pieces at Code Llama's ids (▁<PRE> 32007, ▁<SUF> 32008, ▁<MID> 32009, ▁<EOT> 32010); the
    other added pieces are placeholders. The infilling pieces are ordinary pieces in one
    variant and control pieces in the other: herd finds them either way."""
    model = pb.ModelProto()
    model.ParseFromString(require_shared("tokenizers", "llama2", "tokenizer.model").read_bytes())
    names = {7: "▁<PRE>", 8: "▁<SUF>", 9: "▁<MID>", 10: "▁<EOT>"}
    kind = pb.ModelProto.SentencePiece.NORMAL if request.param == "normal" else pb.ModelProto.SentencePiece.CONTROL
    for i in range(16):
        piece = model.pieces.add(piece=names.get(i, f"▁<unused_{i}>"), score=0.0)
        piece.type = kind if i in names else pb.ModelProto.SentencePiece.UNUSED
    data = model.SerializeToString()
    return SentencePieceTokenizer(data, "codellama-like tokenizer.model"), data


def meta_infilling_tokens(sp, pre: str, suf: str, suffix_first: bool) -> list[int]:
    """Meta's codellama `infilling_prompt_tokens`, on the sentencepiece library directly."""
    bare = sp.encode("☺" + suf)[2:]
    if suffix_first:
        return [1, 32007, 32008, *bare, 32009, *sp.encode(pre)]
    return [1, 32007, *sp.encode(pre), 32008, *bare, 32009]


def test_prompt_text_is_the_published_format():
    assert infill_prompt("def f():\n", "\n    return x") == "<PRE> def f():\n <SUF>\n    return x <MID>"
    assert infill_prompt("a", "b", suffix_first=True) == "<PRE> <SUF>b <MID> a"
    assert infill_prompt("", "") == "<PRE>  <SUF> <MID>"


def test_prompt_ids_match_meta(codellama):
    import sentencepiece

    tok, data = codellama
    sp = sentencepiece.SentencePieceProcessor(model_proto=data)
    cases = [(PREFIX, SUFFIX), ("x = ", ""), ("", "y"), ("  indented", "  also"), ("Ünï 🦙", "\n\n")]
    for pre, suf in cases:
        for suffix_first in (False, True):
            ids = infill_ids(tok, pre, suf, suffix_first)
            assert ids == meta_infilling_tokens(sp, pre, suf, suffix_first), (pre, suf, suffix_first)
            if sp.id_to_piece(32007) == "▁<PRE>" and not sp.is_control(32007) and pre:
                # the ids decode to the published text (BOS left out; with an empty prefix the
                # tokens hold one space fewer than the text: nothing encodes to nothing)
                assert sp.decode(ids[1:]) == infill_prompt(pre, suf, suffix_first)
    assert infill_stop_ids(tok) == {32010, 2}


def test_infill_errors(llama2, llama3):
    for tok in (llama2, llama3):
        with pytest.raises(HerdError, match="Code Llama vocabulary"):
            infill_ids(tok, "a", "b")
    with pytest.raises(HerdError, match="strings"):
        infill_ids(llama2, None, "b")


def test_llm_infill_greedy_and_eot(codellama):
    tok, _ = codellama
    torch.manual_seed(0)
    cfg = tiny_config("llama2", vocab_size=32016, family="codellama")
    model = spread_init(Transformer(cfg)).eval()
    llm = LLM(model, tok)
    ids = llm.encode_infill(PREFIX, SUFFIX)
    assert ids == infill_ids(tok, PREFIX, SUFFIX)
    # greedy through the cache equals greedy by full forward passes from the infill prompt
    expected, seq = [], list(ids)
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
            if nxt in llm.infill_stop_ids():
                break
            expected.append(nxt)
            seq.append(nxt)
    assert llm.infill(PREFIX, SUFFIX, max_tokens=6, temperature=0) == tok.decode(expected)
    assert "".join(llm.stream_infill(PREFIX, SUFFIX, max_tokens=6, temperature=0)) == tok.decode(expected)
    # make <EOT> the first greedy token: the middle is then empty
    with torch.no_grad():
        first = model(torch.tensor([ids]))[0, -1]
        assert first.max() > 0
        model.output.weight[32010] = 2 * model.output.weight[int(first.argmax())]
    assert llm.infill(PREFIX, SUFFIX, max_tokens=6, temperature=0) == ""


def test_cli_infill(codellama, tmp_path):
    from herd.checkpoint import save_hf
    from test_cli import herd as run_herd

    tok, data = codellama
    if tok.token_id("▁<PRE>") is not None:
        pytest.skip("the CLI runs once, on the variant with ordinary infilling pieces")
    torch.manual_seed(1)
    cfg = tiny_config("llama2", vocab_size=32016)
    model = spread_init(Transformer(cfg)).eval()
    save_hf(cfg, model.state_dict(), tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(data)
    expected = LLM(model, tok).infill("x = ", "\nprint(x)", max_tokens=5, temperature=0)
    r = run_herd("infill", "-m", str(tmp_path), "--prefix", "x = ", "--suffix", "\nprint(x)", "-n", "5")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
    r = run_herd("infill", "-m", str(tmp_path))
    assert r.returncode == 2 and "--prefix" in r.stderr


def test_server_completions_with_suffix_infill(codellama):
    import openai

    from herd.engine import Engine
    from herd.serve import create_app
    from serving import running

    tok, _ = codellama
    torch.manual_seed(1)
    cfg = tiny_config("llama2", vocab_size=32016, max_seq_len=256)
    llm = LLM(spread_init(Transformer(cfg)).eval(), tok, name="code")
    expected = llm.infill("x = ", "\nprint(x)", max_tokens=6, temperature=0)
    with running(create_app(Engine(llm, max_batch=2, ctx=128))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        r = client.completions.create(model="code", prompt="x = ", suffix="\nprint(x)", max_tokens=6, temperature=0)
        assert r.choices[0].text == expected
