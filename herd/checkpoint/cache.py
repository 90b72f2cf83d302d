"""The packed form of a GGUF model in the store, kept beside it so that loading it again skips the
GGUF header parse and the repacking of every block (about 1.5 s of the default model's start).

The cache is `.packed/` in the model's folder: a herd packed checkpoint (herd.checkpoint.packed:
herd.json, model.safetensors memory-mapped on load, the GGUF's tokenizer metadata) holding what the
kernels read, the weights in their packed layout (nothing that depends on how activations are
quantized), plus `source.json`, which says what it was made from. It is used only while that
still holds, else rebuilt from the GGUF:
- the GGUF is the same file: same size, modification time and inode (a new pull or import
  replaces the file, and so changes the inode);
- the code that lays the cache out is the same (a hash of its modules' sources), so an upgrade
  that changes a packed layout never reads an old cache;
- the cache's files are the ones written (same names, sizes and modification times), none a link;
- and it loads as any herd packed checkpoint does, every shape, dtype and offset checked.
It is written whole in a working folder of the store (`.pull-PID-*`, deleted by the store once PID
is dead) and renamed into place, so no reader sees half of one. Only GGUF files inside the store
are cached: herd writes nowhere else. A store herd cannot write just goes without.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from herd import __version__
from herd.checkpoint.base import Checkpoint
from herd.checkpoint.gguf_packed import load_gguf_packed
from herd.checkpoint.packed import load_packed, save_packed
from herd.errors import HerdError
from herd.model import Transformer
from herd.store import store_dir

CACHE = ".packed"
STAMP = "source.json"
# the modules whose code decides what the cache holds: GGUF reading, repacking, the packed layers
# and checkpoint format, the config and the GGUF tokenizer
_LAYOUT_MODULES = ("herd.checkpoint.gguf_file", "herd.checkpoint.gguf_packed", "herd.checkpoint.packed",
                   "herd.quant.gguf", "herd.quant.linear", "herd.config", "herd.tokenizer.from_gguf")


def cache_dir(gguf: Path) -> Path | None:
    """Where the cache of the GGUF file `gguf` goes, or None when the file is not in the store."""
    try:
        root = store_dir()
    except HerdError:  # a store herd will not use (its folder is a link): no cache
        return None
    folder = gguf.resolve().parent
    return folder / CACHE if folder.parent == root and not folder.is_symlink() else None


def _layout_hash() -> str:
    digest = hashlib.sha256(__version__.encode())
    for name in _LAYOUT_MODULES:
        digest.update(Path(importlib.import_module(name).__file__).read_bytes())
    return digest.hexdigest()


def _file_id(path: Path) -> list[int]:
    st = path.lstat()
    return [st.st_size, st.st_mtime_ns]


def _stamp(gguf: Path, cache: Path) -> dict[str, Any]:
    st = gguf.stat()
    return {"source": [st.st_size, st.st_mtime_ns, st.st_ino], "layout": _layout_hash(),
            "files": {p.name: _file_id(p) for p in sorted(cache.iterdir()) if p.name != STAMP}}


def fresh(gguf: Path, cache: Path) -> bool:
    """Whether `cache` holds the packed form of `gguf` as it is now (see the module docstring)."""
    try:
        if cache.is_symlink() or not cache.is_dir() or any(p.is_symlink() for p in cache.iterdir()):
            return False
        return json.loads((cache / STAMP).read_text(encoding="utf-8")) == _stamp(gguf, cache)
    except (OSError, ValueError):
        return False


def load_gguf_cached(gguf: Path, tokenizer: bool = True) -> tuple[Transformer, Checkpoint]:
    """`load_gguf_packed`, from the store's cache when it is fresh; otherwise from the GGUF, then
    writing the cache for next time."""
    cache = cache_dir(gguf)
    if cache is not None and fresh(gguf, cache):
        try:
            model, ckpt = load_packed(cache, tokenizer)
            return model, dataclasses.replace(ckpt, format="gguf", path=gguf)
        except HerdError:
            pass  # damaged in a way the stamp does not show: rebuilt below
    model, ckpt = load_gguf_packed(gguf, tokenizer)
    if cache is not None:
        write_cache(gguf, cache, model, ckpt)
    return model, ckpt


def prepare(gguf: Path) -> None:
    """Build the cache of a GGUF file in the store unless a fresh one is there (`herd pull`)."""
    cache = cache_dir(gguf)
    if cache is not None and not fresh(gguf, cache):
        write_cache(gguf, cache, *load_gguf_packed(gguf, tokenizer=False))


def write_cache(gguf: Path, cache: Path, model: Transformer, ckpt: Checkpoint) -> None:
    """Write `cache` whole in a working folder of the store, then rename it into place (replacing
    a stale one). Gives up quietly when the store cannot be written or another process got there
    first: the model then loads from the GGUF."""
    try:
        with tempfile.TemporaryDirectory(prefix=f".pull-{os.getpid()}-", dir=cache.parent.parent) as work:
            built = Path(work) / "new"
            save_packed(model, ckpt, built)
            stamp = _stamp(gguf, built)
            (built / STAMP).write_text(json.dumps(stamp), encoding="utf-8")
            if cache.is_symlink() or cache.is_file():
                cache.unlink()
            elif cache.exists():
                os.rename(cache, Path(work) / "old")  # deleted with the working folder, never followed
            os.rename(built, cache)
    except (OSError, HerdError):
        pass
