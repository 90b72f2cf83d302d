import math

import pytest
import torch

from herd.errors import HerdError
from herd.generate import Sampler, SamplingParams, StopStrings
from herd.generate.sampling import draw


def sampler(**kw) -> Sampler:
    return Sampler(SamplingParams(**kw), prompt_ids=[], vocab_size=4)


def draws(s: Sampler, logits, n=4000) -> torch.Tensor:
    return torch.bincount(torch.tensor([s(logits) for _ in range(n)]), minlength=4).float() / n


LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))


def test_greedy_is_argmax():
    assert sampler(temperature=0)(torch.tensor([0.1, 3.0, 2.9, -1])) == 1


def test_sampling_follows_the_softmax():
    freq = draws(sampler(temperature=1.0, seed=0), LOGITS)
    torch.testing.assert_close(freq, LOGITS.exp(), atol=0.03, rtol=0)


def test_draw_never_picks_a_zero_weight_token():
    gen = torch.Generator().manual_seed(0)
    for weights, only in (([0.0, 1.0, 0.0], 1), ([0.0, 0.0, 2.0], 2), ([3.0, 0.0, 0.0], 0)):
        assert {draw(torch.tensor(weights), gen) for _ in range(200)} == {only}


def test_temperature_sharpens():
    freq = draws(sampler(temperature=0.5, seed=0), LOGITS)
    expected = torch.softmax(LOGITS / 0.5, 0)
    torch.testing.assert_close(freq, expected, atol=0.03, rtol=0)


def test_top_k_top_p_min_p_restrict_the_support():
    assert draws(sampler(temperature=1, top_k=2, seed=1), LOGITS)[2:].sum() == 0
    # top_p 0.6: 0.5 alone is short of it, 0.5 + 0.3 reaches it: tokens 0 and 1 only
    freq = draws(sampler(temperature=1, top_p=0.6, seed=2), LOGITS)
    assert freq[2:].sum() == 0 and freq[1] == pytest.approx(0.3 / 0.8, abs=0.03)
    # min_p 0.5: tokens below 0.25 are dropped
    assert draws(sampler(temperature=1, min_p=0.5, seed=3), LOGITS)[2:].sum() == 0


def test_same_seed_same_draws_other_seed_other_draws():
    a = [sampler(temperature=1, seed=7)(LOGITS) for _ in range(1)]
    s1, s2, s3 = sampler(temperature=1, seed=7), sampler(temperature=1, seed=7), sampler(temperature=1, seed=8)
    seq1 = [s1(LOGITS) for _ in range(50)]
    assert seq1 == [s2(LOGITS) for _ in range(50)]
    assert seq1 != [s3(LOGITS) for _ in range(50)]
    assert a[0] == seq1[0]


def test_repetition_penalty_covers_the_prompt():
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=1.2), prompt_ids=[0], vocab_size=2)
    assert s(torch.tensor([2.0, 1.9])) == 1
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=1.2), prompt_ids=[1], vocab_size=2)
    assert s(torch.tensor([-1.0, -1.1])) == 0  # negative logits are multiplied, pushed further down


def test_presence_and_frequency_penalties_count_output_tokens():
    s = sampler(temperature=0, frequency_penalty=0.4)
    logits = torch.tensor([1.0, 0.5, 0.0, 0.0])
    assert s(logits) == 0
    s.update(0)
    assert s(logits) == 0  # 1.0 - 0.4 = 0.6 > 0.5
    s.update(0)
    assert s(logits) == 1  # 1.0 - 0.8 = 0.2 < 0.5
    p = sampler(temperature=0, presence_penalty=0.6)
    p.update(0)
    p.update(0)
    assert p(logits) == 1  # presence counts once: 0.4 < 0.5


@pytest.mark.parametrize("bad", [
    dict(max_tokens=0), dict(max_tokens=-3), dict(temperature=-0.1), dict(temperature=math.nan), dict(top_p=0),
    dict(top_p=1.5), dict(top_k=-1), dict(min_p=2), dict(repetition_penalty=0), dict(presence_penalty=3),
    dict(stop=[""]), dict(seed="x"),
])
def test_bad_settings_are_rejected(bad):
    with pytest.raises(HerdError):
        SamplingParams(**bad)


def feed_all(stops, pieces):
    s = StopStrings(stops)
    out, hit = "", False
    for piece in pieces:
        text, hit = s.feed(piece)
        out += text
        if hit:
            return out, True
    return out + s.flush(), False


def test_stop_strings_split_across_pieces_are_caught_and_never_emitted():
    assert feed_all(["\n\n"], ["Hello", "\n", "\nBye"]) == ("Hello", True)
    assert feed_all(["END"], ["abc E", "N", "D more"]) == ("abc ", True)
    assert feed_all(["END"], ["abc E", "N", "d"]) == ("abc ENd", False)
    assert feed_all(["z", "xy"], ["axyz"]) == ("a", True)  # the earliest stop wins


def test_text_that_may_start_a_stop_is_held_back():
    s = StopStrings(["STOP"])
    assert s.feed("go ST") == ("go ", False)
    assert s.feed("O") == ("", False)
    assert s.feed("W") == ("STOW", False)
    assert s.feed("S") == ("", False)
    assert s.flush() == "S"


def test_the_command_line_sampling_flags_are_the_fields_of_sampling_params():
    """Every SamplingParams field with a flag is one, under its own name and default (a command may
    only change the temperature's), and reading them needs no torch: `herd --help` stays fast."""
    import subprocess
    import sys

    from herd.cli import build_parser, sampling_options
    from herd.llm import make_params

    parser = build_parser()
    assert make_params(sampling_options(parser.parse_args(["generate", "x"]))) == SamplingParams()
    for command, temperature in (("chat", 0.7), ("infill", 0.0)):
        options = sampling_options(parser.parse_args([command]))
        assert make_params(options) == SamplingParams(temperature=temperature)
    options = sampling_options(parser.parse_args(["generate", "-n", "5", "--stop", "a", "--stop", "b", "--seed", "3"]))
    assert (options["max_tokens"], options["stop"], options["seed"]) == (5, ["a", "b"], 3)
    code = "import sys, herd.cli; herd.cli.build_parser(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
