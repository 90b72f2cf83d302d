from __future__ import annotations

import pytest
import torch

from herd.shared import shared_path

torch.set_num_threads(2)


@pytest.fixture
def shared():
    """shared("models", "x.bin") -> Path of a real reference file; skips the test when absent."""

    def get(*parts: str):
        path = shared_path(*parts)
        if not path.exists():
            pytest.skip(f"reference file {path} is absent (set HERD_SHARED to the shared/ folder)")
        return path

    return get
