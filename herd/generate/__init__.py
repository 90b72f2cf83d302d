"""Turning a model and a tokenizer into text: sampling, stop rules, streaming, the decode loop."""

from herd.generate.loop import run_batch
from herd.generate.sampling import Sampler, SamplingParams
from herd.generate.sequence import Sequence
from herd.generate.stopping import StopStrings

__all__ = ["Sampler", "SamplingParams", "Sequence", "StopStrings", "run_batch"]
