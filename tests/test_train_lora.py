"""LoRA and NF4 against the libraries that define them: adapters saved by herd load with PEFT onto
transformers' LlamaForCausalLM (and the other way round) with the same logits; NF4 codes are
bit-identical to bitsandbytes'; merging, per-row adapters, and QLoRA's memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import spread_init

from herd.checkpoint import save_hf
from herd.checkpoint.peft import load_adapter, load_adapters, save_adapter
from herd.config import ModelConfig
from herd.errors import HerdError
from herd.model import Transformer
from herd.model.lora import LoraConfig, adapters, add_adapter, merge_adapter, set_adapters
from herd.quant.nf4 import NF4_LEVELS, NF4Linear, dequantize_nf4, quantize_linears_nf4, quantize_nf4

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models

# GQA, untied classifier (so lm_head can carry an adapter too)
GQA = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=96, max_seq_len=64)
# SmolLM2-like: 6 query heads on 2 KV heads, tied embeddings
TIED = ModelConfig(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=80, hidden_dim=64, max_seq_len=64,
                   tie_embeddings=True, rope_theta=1e5)


def base_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return spread_init(Transformer(cfg)).eval()


@torch.no_grad()
def randomize_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    """B starts at zero; give every adapter matrix values so the update is far from zero."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if ".adapters." in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def tokens(vocab: int, rows: int = 2, n: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, n), generator=torch.Generator().manual_seed(3))


# ---- NF4 ----

def test_nf4_levels_are_the_normal_quantiles_of_the_paper():
    """QLoRA's construction: 8 positive and 7 negative quantiles of N(0, 1) between offset
    0.9677 and 0.5, an exact zero, scaled to [-1, 1]."""
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    assert torch.allclose(levels / levels.abs().max(), NF4_LEVELS.double(), atol=1e-6)


@pytest.mark.parametrize("shape", [(96, 128), (3, 64), (1536, 576)])
def test_nf4_is_bit_identical_to_bitsandbytes(shape):
    bnb = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    w.view(-1)[:64] = 0  # an all-zero block
    w.view(-1)[64:128] *= 100  # a block with an outlier scale
    q, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    codes, absmax = quantize_nf4(w)
    assert torch.equal(q.flatten(), codes)
    assert torch.equal(state.absmax, absmax)
    assert torch.equal(bnb.dequantize_4bit(q, state), dequantize_nf4(codes, absmax, w.shape))


@pytest.mark.parametrize("in_features,out_features,chunk", [(128, 96, 1 << 20), (128, 96, 1000), (96, 64, 100)])
def test_nf4_linear_matches_its_dequantized_weight_forward_and_backward(in_features, out_features, chunk):
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(torch.nn.Linear(in_features, out_features, bias=False))
    layer.chunk = chunk  # several row slices, aligned to the 64-weight blocks
    w = layer.dequantize()
    x = torch.randn(3, 5, in_features, requires_grad=True)
    y = layer(x)
    y.backward(g := torch.randn_like(y))
    x2 = x.detach().clone().requires_grad_()
    (x2 @ w.T).backward(g)
    assert torch.allclose(y, x2 @ w.T, atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert not any(p.requires_grad for p in layer.parameters())


def test_nf4_error_is_within_half_a_level_step():
    w = torch.randn(256, 256) * 0.02
    err = (dequantize_nf4(*quantize_nf4(w), w.shape) - w).abs().reshape(-1, 64)
    widest_gap = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max()
    assert (err <= w.reshape(-1, 64).abs().amax(1, keepdim=True) * widest_gap / 2 + 1e-7).all()


# ---- PEFT format ----

@pytest.mark.parametrize("cfg,lora", [
    (GQA, LoraConfig(r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj", "lm_head"))),
    (TIED, LoraConfig(r=3, alpha=5, targets=("wq", "wk", "w2"), layers=[1], rslora=True)),
], ids=["gqa-all-linear", "tied-some-layers-rslora"])
def test_peft_loads_an_adapter_saved_by_herd_with_the_same_logits(cfg, lora, tmp_path):
    peft = pytest.importorskip("peft")
    model = base_model(cfg)
    save_hf(cfg, model.state_dict(), tmp_path / "base")
    add_adapter(model, lora)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter", lora)
    x = tokens(cfg.vocab_size)
    with torch.no_grad():
        ours = model(x)
        with adapters(model, None):
            base = model(x)
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(input_ids=x).logits
    assert (ours - base).abs().max() > 1.0  # the adapter matters...
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()  # ...and PEFT agrees


def test_herd_loads_an_adapter_saved_by_peft_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    model = base_model(GQA)
    save_hf(GQA, model.state_dict(), tmp_path / "base")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
                             layers_to_transform=[0, 2], task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    pm.save_pretrained(tmp_path / "adapter")
    x = tokens(GQA.vocab_size)
    cfg = load_adapter(model, tmp_path / "adapter")
    assert cfg.r == 4 and cfg.scale == 3.0 and cfg.layers == (0, 2)
    with torch.no_grad():
        assert torch.allclose(model(x), pm.eval()(input_ids=x).logits, atol=1e-4)


def test_merging_gives_the_logits_of_the_unmerged_adapter():
    model = add_adapter(base_model(GQA), LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj", "lm_head")))
    randomize_adapters(model)
    x = tokens(GQA.vocab_size)
    with torch.no_grad():
        unmerged = model(x)
        merged = merge_adapter(model)(x)
    assert not any(".adapters." in n for n in model.state_dict())
    assert type(model.layers[0].attention.wq) is torch.nn.Linear
    assert torch.allclose(unmerged, merged, atol=1e-4)


def test_merging_into_an_nf4_base_matches_the_qlora_model():
    model = quantize_linears_nf4(base_model(TIED))
    add_adapter(model, LoraConfig(r=4))
    randomize_adapters(model)
    x = tokens(TIED.vocab_size)
    with torch.no_grad():
        assert torch.allclose(model(x), merge_adapter(model)(x), atol=1e-4)


def test_adapters_picked_per_row_match_each_adapter_alone(tmp_path):
    model = base_model(GQA)
    for i, name in enumerate(("poet", "coder")):
        other = add_adapter(base_model(GQA), LoraConfig(r=2, targets=("q_proj", "up_proj")))
        randomize_adapters(other, seed=i)
        save_adapter(other, tmp_path / name, LoraConfig(r=2, targets=("q_proj", "up_proj")))
    configs = load_adapters(model, {"poet": tmp_path / "poet", "coder": tmp_path / "coder"})
    assert set(configs) == {"poet", "coder"}
    x = tokens(GQA.vocab_size, rows=1).repeat(3, 1)
    with torch.no_grad():
        alone = {}
        for name in ("poet", None, "coder"):
            with adapters(model, name):
                alone[name] = model(x[:1])
        set_adapters(model, ["poet", None, "coder"])
        mixed = model(x)
    for row, name in enumerate(("poet", None, "coder")):
        assert torch.allclose(mixed[row], alone[name][0], atol=1e-5)
    assert (alone["poet"] - alone["coder"]).abs().max() > 0.1


def test_bad_adapters_are_one_line_errors(tmp_path):
    model = base_model(GQA)
    with pytest.raises(HerdError, match="not linear layers"):
        LoraConfig(targets=("embed_tokens",))
    with pytest.raises(HerdError, match="layer 7 does not exist"):
        add_adapter(model, LoraConfig(layers=[7]))
    with pytest.raises(HerdError, match="adapter_config.json"):
        load_adapter(model, tmp_path)
    other = add_adapter(base_model(TIED), LoraConfig(r=2, targets=("q_proj",)))
    save_adapter(other, tmp_path / "tied", LoraConfig(r=2, targets=("q_proj",)))
    with pytest.raises(HerdError, match="has shape"):
        load_adapter(base_model(GQA), tmp_path / "tied")
    cfg = json.loads((tmp_path / "tied" / "adapter_config.json").read_text())
    (tmp_path / "tied" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(HerdError, match="use_dora"):
        load_adapter(base_model(TIED), tmp_path / "tied")
    with pytest.raises(HerdError, match="no adapter named"):
        set_adapters(other, "missing")


# ---- QLoRA memory ----

MEMORY_RUN = """
import json, sys, torch
from herd.train.config import TrainConfig
from herd.model.lora import LoraConfig
from herd.train.recipes import finetune
base, data, out, mode, steps = sys.argv[1:]
cfg = TrainConfig(out=out, steps=int(steps), batch_size=1, seq_len=8, lr=1e-2, min_lr=1e-2, log_every=1, progress=False)
finetune(base, data, cfg, lora=LoraConfig(r=8), qlora=mode == "qlora", dtype="bfloat16" if mode == "lora16" else "auto")
"""


def test_qlora_adapters_learn_on_an_nf4_base_that_takes_a_quarter_of_the_bf16_bytes():
    """In process: LoRA on a base whose linear layers are NF4 fits a batch (the loss falls) and
    the frozen base's matrices take 4.5 bits per weight against bf16's 16."""
    from herd.train.objectives import LanguageModeling

    cfg = ModelConfig(dim=128, n_layers=2, n_heads=4, vocab_size=96, hidden_dim=256, max_seq_len=64)
    bf16 = base_model(cfg).to(torch.bfloat16)
    model = quantize_linears_nf4(base_model(cfg), skip=())
    nbytes = lambda m: sum(t.numel() * t.element_size() for n, t in m.state_dict().items()  # noqa: E731
                           if n.startswith("layers."))
    assert nbytes(model) < nbytes(bf16) * 0.3
    add_adapter(model, LoraConfig(r=8, alpha=16))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(".adapters." in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=2e-2)
    x = tokens(cfg.vocab_size, rows=4, n=33)
    batch = {"tokens": x[:, :-1], "targets": x[:, 1:]}
    losses = []
    for _ in range(8):
        loss = LanguageModeling()(model, batch)["loss"] / batch["targets"].numel()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.slow
def test_qlora_trains_in_less_memory_than_16_bit_lora(tmp_path, shared):
    """The same LoRA fine-tuning of a 57M-parameter model (random weights: memory does not depend
    on them) with the frozen base in bf16, and in NF4; each run in its own process, peak resident
    memory measured over the training steps."""
    from herd.train.vocab import train_tokenizer

    train_tokenizer([shared("corpora", "tinyshakespeare_input.txt")], tmp_path / "tok", 512)
    cfg = ModelConfig(dim=768, n_layers=8, n_heads=12, vocab_size=512, hidden_dim=2048, max_seq_len=64)
    save_hf(cfg, base_model(cfg).state_dict(), tmp_path / "base")
    from herd.tokenizer import load_tokenizer

    load_tokenizer(tmp_path / "tok").save(tmp_path / "base")
    text = shared("corpora", "tinyshakespeare_input.txt").read_text()[:40]
    (tmp_path / "data.jsonl").write_text(json.dumps({"text": text}) + "\n")  # one passage to learn
    peaks, losses = {}, {}
    for mode, steps in (("lora16", 1), ("qlora", 4)):  # bf16 matmuls are slow on CPUs without bf16 units
        out = tmp_path / mode
        # glibc hands freed blocks of up to 32 MiB back to its heap rather than to the system, so
        # resident memory would count dead temporaries; with a fixed 1 MiB mmap threshold freed
        # buffers are returned at once and the peak counts live memory (the same for both runs).
        r = subprocess.run([sys.executable, "-c", MEMORY_RUN, str(tmp_path / "base"), str(tmp_path / "data.jsonl"),
                            str(out), mode, str(steps)], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20), "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-2000:]
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        peaks[mode] = max(rec["peak_mem_mb"] for rec in records)
        losses[mode] = [rec["loss"] for rec in records]
    print(f"peak resident memory: 16-bit LoRA {peaks['lora16']:.0f} MiB, QLoRA {peaks['qlora']:.0f} MiB")
    # the linear layers' weights: 108 MiB in bf16, 30 MiB in NF4
    assert peaks["qlora"] < peaks["lora16"] - 50
    assert losses["qlora"][-1] < losses["qlora"][0] - 0.5


# ---- serving adapters ----

def test_serve_picks_an_adapter_per_request_by_model_name(tmp_path, shared):
    """`herd serve --lora NAME=PATH ...`: each request names the base model or an adapter; the
    answer is what the model gives with that adapter alone (greedy, so exactly)."""
    import httpx

    import herd
    from herd.engine import Engine
    from herd.serve import create_app
    from serving import running

    llm = herd.load(shared("models", "stories260K", "stories260K.gguf"))
    for i, name in enumerate(("poet", "coder")):
        lora = LoraConfig(r=4, targets=("q_proj", "v_proj", "down_proj"))
        other = add_adapter(herd.load(shared("models", "stories260K", "stories260K.gguf")).model, lora)
        randomize_adapters(other, seed=i)
        save_adapter(other, tmp_path / name, lora)
    llm.load_adapters({"poet": tmp_path / "poet", "coder": tmp_path / "coder"})
    prompt, n = "Once upon a time", 24
    expected = {}
    for name in ("base", "poet", "coder"):
        with adapters(llm.model, None if name == "base" else name):
            expected[name] = llm.generate(prompt, max_tokens=n, temperature=0)
    assert len(set(expected.values())) == 3  # each adapter changes the story
    with running(create_app(Engine(llm, max_batch=4, ctx=128), name="base")) as url, httpx.Client(timeout=60) as c:
        assert [m["id"] for m in c.get(url + "/v1/models").json()["data"]] == ["base", "poet", "coder"]
        assert [m["name"] for m in c.get(url + "/api/tags").json()["models"]] == ["base", "poet", "coder"]
        for name in ("poet", "base", "coder"):
            r = c.post(url + "/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": n,
                                                      "temperature": 0}).json()
            assert r["model"] == name and r["choices"][0]["text"] == expected[name], (name, r)
        r = c.post(url + "/v1/completions", json={"model": "other", "prompt": prompt})
        assert r.status_code == 404 and "'poet'" in r.json()["error"]["message"]
