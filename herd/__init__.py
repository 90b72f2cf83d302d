"""herd: the Llama family of language models, end to end.

    import herd
    llm = herd.load()                       # the default model, pulled on first use
    llm.generate("Once upon a time", max_tokens=64, temperature=0.0)
"""

import os

# OpenMP threads (torch's and herd's kernels share one runtime) wait for the next parallel region
# asleep rather than spinning: on a busy machine, with more runnable threads than cores, spinning
# made a 2-thread decode step ~10x slower (50 ms -> 500+ ms measured). Read when torch is first
# imported, so it only takes effect when herd is imported before torch, and never overrides the user.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

from herd.errors import HerdError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LLM", "HerdError", "load", "__version__"]


def __getattr__(name: str):
    # torch is imported on first use, so `herd --help` and friends start fast.
    if name in ("LLM", "load"):
        from herd import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'herd' has no attribute {name!r}")
