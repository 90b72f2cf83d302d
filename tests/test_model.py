import torch

from herd.model import Transformer
from helpers import tiny_config


def tiny(tie_embeddings: bool = False) -> Transformer:
    """Llama 3's features (GQA, rope scaling), untied unless asked, over 97 tokens (the tests below use 97)."""
    torch.manual_seed(0)
    return Transformer(tiny_config("llama3", vocab_size=97, tie_embeddings=tie_embeddings)).eval()


@torch.no_grad()
def test_cached_decode_equals_full_forward():
    m = tiny()
    x = torch.randint(0, 97, (2, 20))
    full = m(x)
    cache = m.new_cache(2, 32)
    steps = [m(x[:, :7], torch.arange(7), cache)]
    steps += [m(x[:, i:i + 1], torch.tensor([i]), cache) for i in range(7, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_rows_at_different_positions_match_running_alone():
    m = tiny()
    a, b = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 4))
    alone_a, alone_b = m(a)[0, -1], m(b)[0, -1]
    # b right-padded with junk; each row's logits taken at its own last token
    batch = torch.cat([a, torch.cat([b, torch.full((1, 5), 3)], 1)])
    cache = m.new_cache(2, 16)
    out = m(batch, torch.arange(9), cache, logits_at=torch.tensor([8, 3]))[:, 0]
    torch.testing.assert_close(out[0], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], alone_b, atol=1e-5, rtol=1e-5)
    # next token: row 0 at position 9, row 1 at position 4 (overwriting the junk)
    nxt = torch.tensor([[5], [6]])
    step = m(nxt, torch.tensor([[9], [4]]), cache)[:, 0]
    torch.testing.assert_close(step[0], m(torch.cat([a, nxt[:1]], 1))[0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1], m(torch.cat([b, nxt[1:]], 1))[0, -1], atol=1e-5, rtol=1e-5)


def test_tied_embeddings_share_storage():
    m = tiny(tie_embeddings=True)
    assert m.output.weight is m.tok_embeddings.weight
    assert "output.weight" in m.state_dict()


def test_meta_device_build_keeps_rope_frequencies():
    with torch.device("meta"):
        m = Transformer(tiny().config)
    assert m.inv_freq.device.type == "cpu" and torch.isfinite(m.inv_freq).all()


def test_training_loss_fused_with_the_head_matches_cross_entropy_of_the_logits(monkeypatch):
    """forward(targets=...) sums the cross-entropy chunk by chunk, gradients computed with the
    logits; PyTorch's cross_entropy on the full logits is the reference (loss and every gradient)."""
    import herd.model.loss

    monkeypatch.setattr(herd.model.loss, "CHUNK_ELEMENTS", 97 * 7)  # 7 rows a chunk: several, the last short
    for tied in (False, True):
        m = tiny(tie_embeddings=tied).train()
        x = torch.randint(0, 97, (3, 17))
        targets = torch.randint(0, 97, (3, 17))
        targets[0, :5] = targets[2, 9] = -100
        ref = torch.nn.functional.cross_entropy(m(x).flatten(0, 1), targets.flatten(), reduction="sum")
        (ref * 0.3).backward()
        expected = {n: p.grad.clone() for n, p in m.named_parameters()}
        m.zero_grad()
        loss = m(x, targets=targets)
        (loss * 0.3).backward()
        torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-6)
        for n, p in m.named_parameters():
            torch.testing.assert_close(p.grad, expected[n], atol=1e-6, rtol=1e-5, msg=n)
        with torch.no_grad():
            torch.testing.assert_close(m(x, targets=targets), ref.detach(), atol=1e-4, rtol=1e-6)
    m.zero_grad()
    m(x, targets=torch.full_like(targets, -100)).backward()  # nothing to learn from: zero gradients
    assert all(not p.grad.any() for p in m.parameters())


def test_device_and_dtype_are_where_and_in_what_the_activations_are():
    """A packed model keeps 16-bit weights but computes in fp32: model.dtype says the latter, and
    its KV cache follows."""
    from herd.quant import quantize

    m = quantize(tiny().to(torch.bfloat16), 16)
    assert m.tok_embeddings.weight.dtype == torch.bfloat16
    assert (m.device, m.dtype) == (torch.device("cpu"), torch.float32)
    assert m.new_cache(1, 8).k.dtype == torch.float32
