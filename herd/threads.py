"""The OpenMP settings herd gives itself when imported, and the environment without them for the
peers a bench runs as child processes (llama.cpp, transformers).

herd's OpenMP threads wait for work asleep: on a machine with more runnable threads than cores,
spinning made a 2-thread decode step ~10x slower (50 ms -> 500+ ms measured). The setting is read
when torch is first imported, so it only takes effect when herd is imported before torch, and it
never overrides the user's. A peer must run as its own users run it: with the same setting,
llama.cpp's threads slept between every operation (Q8_0 decode 214 -> 42 tok/s).
"""

from __future__ import annotations

import os

DEFAULTS = {"OMP_WAIT_POLICY": "passive"}
# names of the variables herd set (not the user), handed down to herd's own child processes
MARK = "HERD_SET_ENV"


def apply_defaults() -> None:
    """Set each of DEFAULTS the user has not set, and record which ones herd set."""
    mine = set(filter(None, os.environ.get(MARK, "").split(",")))
    for key, value in DEFAULTS.items():
        if key not in os.environ:
            os.environ[key] = value
            mine.add(key)
    if mine:
        os.environ[MARK] = ",".join(sorted(mine))


def peer_environment() -> dict[str, str]:
    """This process's environment less what herd set in it: what a peer's process gets."""
    mine = set(os.environ.get(MARK, "").split(",")) | {MARK}
    return {k: v for k, v in os.environ.items() if k not in mine}
