"""What `herd` does before the first token: bad input is refused before torch is imported, no
load imports torch's compiler, and a model in the store loads from its cached packed form, which
is rebuilt, never trusted, when it is stale or damaged. No timings: what is imported and what is
read is checked instead."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from herd.checkpoint import cache as cache_module
from herd.checkpoint import gguf_file, load_model
from herd.checkpoint.cache import CACHE, STAMP, fresh

# what bad input must be refused without: seconds of import in all (torch alone 1.5 s here)
HEAVY = ("torch", "numpy", "transformers", "fastapi", "gguf", "safetensors")


def run_python(code: str, env: dict | None = None) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("args", [
    ["generate", "-m", "/no/such/model.gguf", "hi"],
    ["generate", "-m", "no-such-model", "hi"],
    ["generate", "--temperature", "-1", "hi"],
    ["generate", "--top-p", "2", "hi"],
    ["generate", "--bogus", "hi"],
    ["chat", "-m", "/no/such/model.gguf"],
    ["infill", "-m", "no-such-model", "--prefix", "def f("],
    ["guard", "-m", "/no/such/model.gguf", "is this safe?"],
    ["generate", "--help"],
])
def test_bad_input_is_refused_before_torch_is_imported(args, tmp_path):
    code = f"""
import sys
from herd.cli import main
try:
    rc = main({args!r})
except SystemExit as e:
    rc = e.code
print(rc, [m for m in {HEAVY!r} if m in sys.modules])
"""
    out = run_python(code, env={"HERD_HOME": str(tmp_path)})
    rc, imported = out.strip().splitlines()[-1].split(" ", 1)
    assert rc == ("0" if "--help" in args else "2")
    assert imported == "[]", f"imported before refusing: {imported}"


def test_loading_the_default_model_imports_only_what_it_uses(smollm2_gguf):
    """torch._dynamo (and sympy with it) is seconds of import that inference never uses; protobuf
    (SentencePiece vocabularies) and jsonschema (constrained output) are a tenth of a second each
    that a byte-level BPE model generating plain text does not need."""
    code = f"""
import sys, herd
llm = herd.load({str(smollm2_gguf)!r}, quantize="keep")
llm.generate("Hi", max_tokens=2, temperature=0)
print([m for m in ("torch._dynamo", "sympy", "google.protobuf", "jsonschema") if m in sys.modules])
"""
    assert run_python(code).strip().splitlines()[-1] == "[]"


def load(path):
    """(model, checkpoint) of a GGUF kept packed, as `herd generate` loads it."""
    return load_model(path, torch.float32, quantize_to="keep")


def store_with(home, gguf, cache=None):
    """A store in `home` holding `gguf` as the default model (a hard link: no copy) and a copy of
    `cache`, times kept, as its cache; the path of its GGUF."""
    folder = home / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    os.link(gguf, folder / gguf.name)
    if cache is not None:
        shutil.copytree(cache, folder / CACHE)
    return folder / gguf.name


@pytest.fixture(scope="module")
def built_cache(smollm2_gguf, tmp_path_factory):
    """A cache of the default model, built once for the module by a load from a store."""
    home = tmp_path_factory.mktemp("built")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HERD_HOME", str(home))
        gguf = store_with(home, smollm2_gguf)
        load(gguf)
    assert fresh(gguf, gguf.parent / CACHE)
    return gguf.parent / CACHE


@pytest.fixture
def store_model(smollm2_gguf, built_cache, tmp_path, monkeypatch):
    """The default model in a store of its own, with a fresh cache."""
    monkeypatch.setenv("HERD_HOME", str(tmp_path))
    return store_with(tmp_path, smollm2_gguf, built_cache)


def same_model(a, b) -> bool:
    """Same weights, tokenizer, config, chat template and end tokens."""
    sa, sb = a[0].state_dict(), b[0].state_dict()
    text = "Hello <|im_start|> 123"
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa) and \
        a[1].tokenizer.encode(text, special=True) == b[1].tokenizer.encode(text, special=True) and \
        (a[1].config, a[1].chat_template, a[1].eos_ids) == (b[1].config, b[1].chat_template, b[1].eos_ids)


class Counted:
    """Counts the GGUF header parses (every GGUF load starts with one)."""

    def __init__(self, monkeypatch):
        self.parses = 0
        real = gguf_file.GGUFFile.__init__

        def parse(this, path):
            self.parses += 1
            real(this, path)

        monkeypatch.setattr(gguf_file.GGUFFile, "__init__", parse)


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    """The default model loaded from its GGUF, not through a cache (the test's store is another)."""
    return load(smollm2_gguf)


def test_a_second_load_reads_the_cache_not_the_gguf(smollm2_gguf, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("HERD_HOME", str(tmp_path))
    gguf = store_with(tmp_path, smollm2_gguf)
    parses = Counted(monkeypatch)
    first = load(gguf)
    assert parses.parses >= 1 and fresh(gguf, gguf.parent / CACHE)
    parses.parses = 0
    second = load(gguf)
    assert parses.parses == 0
    assert same_model(first, second) and same_model(reference, second)
    assert (second[1].format, second[1].path) == ("gguf", gguf)


def test_pull_prepares_the_cache(shared_wheels, tmp_path, monkeypatch):
    monkeypatch.setenv("HERD_HOME", str(tmp_path))
    from herd.cli import main

    assert main(["pull", "--find-links", str(shared_wheels)]) == 0
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    (gguf,) = folder.glob("*.gguf")
    assert fresh(gguf, folder / CACHE)
    assert [p.name for p in tmp_path.joinpath("models").iterdir()] == ["smollm2-135m-instruct"]  # no working folder left


def _touch(gguf, cache):
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def _replace(gguf, cache):
    """A new file in its place (as a new pull writes), same content and times."""
    st = gguf.stat()
    new = gguf.with_suffix(".new")
    new.write_bytes(gguf.read_bytes())
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, gguf)


def _truncate(gguf, cache):
    with open(cache / "model.safetensors", "r+b") as f:
        f.truncate(1000)


def _scribble_keeping_size_and_time(gguf, cache):
    """Damage the cache where neither its size nor its time shows it: the load's own checks must."""
    path = cache / "model.safetensors"
    st = path.stat()
    with open(path, "r+b") as f:
        f.write(b"\xff" * 64)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _bad_stamp(gguf, cache):
    (cache / STAMP).write_text("{not json")


def _link(gguf, cache):
    """A cache that is a link: never followed, replaced by a real one."""
    os.rename(cache, cache.with_name("elsewhere"))
    os.symlink(cache.with_name("elsewhere"), cache)


def _new_layout(gguf, cache):
    stamp = json.loads((cache / STAMP).read_text())
    (cache / STAMP).write_text(json.dumps({**stamp, "layout": "an older herd"}))


@pytest.mark.parametrize("spoil", [_touch, _replace, _truncate, _scribble_keeping_size_and_time, _bad_stamp, _link,
                                   _new_layout])
def test_a_stale_or_damaged_cache_is_rebuilt(spoil, store_model, reference, monkeypatch):
    cache = store_model.parent / CACHE
    spoil(store_model, cache)
    parses = Counted(monkeypatch)
    rebuilt = load(store_model)
    assert parses.parses >= 1  # read from the GGUF again
    assert same_model(rebuilt, reference)
    assert fresh(store_model, cache) and not cache.is_symlink()
    parses.parses = 0
    assert same_model(load(store_model), reference) and parses.parses == 0  # and the new cache is used
    if spoil is _link:
        assert (cache.with_name("elsewhere") / STAMP).is_file()  # what the link led to is untouched


def test_a_gguf_outside_the_store_is_not_cached(smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("HERD_HOME", str(tmp_path / "home"))
    outside = tmp_path / "mine"
    outside.mkdir()
    os.link(smollm2_gguf, outside / "model.gguf")
    written = []
    monkeypatch.setattr(cache_module, "write_cache", lambda *a: written.append(a))
    load(outside / "model.gguf")
    assert written == [] and [p.name for p in outside.iterdir()] == ["model.gguf"]
    assert not (tmp_path / "home").exists()
