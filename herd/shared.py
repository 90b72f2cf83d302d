"""Where the real reference files live (tokenizers, checkpoints, corpora) for tests and benchmarks.

`HERD_SHARED` names the folder; by default it is `shared/` beside the repository root.
"""

from __future__ import annotations

import os
from pathlib import Path


def shared_dir() -> Path:
    env = os.environ.get("HERD_SHARED")
    if env:
        return Path(env)
    beside_repo = Path(__file__).resolve().parent.parent.parent / "shared"
    return beside_repo if beside_repo.is_dir() else Path.cwd().parent / "shared"


def shared_path(*parts: str) -> Path:
    return shared_dir().joinpath(*parts)
