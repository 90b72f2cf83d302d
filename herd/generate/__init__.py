"""Turning a model and a tokenizer into text: sampling, stop rules, streaming, the decode loop."""

from importlib import import_module

# name -> the module that defines it. Imported on first use, so that the command line reads
# SamplingParams (herd.generate.params) for its flags without importing torch.
_HOMES = {"run_batch": "loop", "Sampler": "sampling", "SamplingParams": "params", "Sequence": "sequence",
          "StopStrings": "stopping"}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'herd.generate' has no attribute {name!r}")
    return getattr(import_module(f"herd.generate.{_HOMES[name]}"), name)
