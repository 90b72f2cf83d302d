"""herd: the Llama family of language models, end to end.

    import herd
    llm = herd.load()                       # the default model, pulled on first use
    llm.generate("Once upon a time", max_tokens=64, temperature=0.0)
"""

from herd.errors import HerdError
from herd.threads import apply_defaults

apply_defaults()  # OpenMP's threads sleep between parallel regions (herd/threads.py says why); before torch

__version__ = "0.1.0"
__all__ = ["LLM", "HerdError", "load", "__version__"]


def __getattr__(name: str):
    # torch is imported on first use, so `herd --help` and friends start fast.
    if name in ("LLM", "load"):
        from herd import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'herd' has no attribute {name!r}")
