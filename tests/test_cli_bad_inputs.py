"""Every subcommand of `herd`, fed bad input, answers with exit 2 and one line on stderr: never a
traceback, never an "internal error". The subcommands and their options are read from the parser,
so a new command or option is covered without touching this file. Every case fails before anything
is loaded, pulled or served: models, data and inputs name a path that does not exist."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

from herd.cli import build_parser, main
from herd.errors import HerdError

BAD_UTF8 = b"hi \xff"
NEGATIVE_OK = {"seed"}  # numeric options for which -5 is a fine value
PATH_OPTIONS = {"model", "data", "out"}  # given a missing path in every case


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every runnable subcommand by its words ("generate", "eval perplexity")."""
    def walk(parser: argparse.ArgumentParser, words: list[str]):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield " ".join(words), parser
            return
        for name, sub in subs[0].choices.items():
            yield from walk(sub, [*words, name])

    return dict(walk(build_parser(), []))


COMMANDS = commands()


def positionals(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not a.option_strings]


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.nargs != 0 and a.dest != "help"]


def failing_args(command: str, missing: str) -> list[str]:
    """ARGS of `herd COMMAND ARGS` that fail at the first look at the input: every positional and
    every model, data or output path names `missing`; required options get their first choice."""
    parser = COMMANDS[command]
    args = command.split() + [missing for _ in positionals(parser)]
    for a in options(parser):
        if a.dest in PATH_OPTIONS or a.required:
            args += [a.option_strings[-1], str(a.choices[0]) if a.choices else missing]
    return args


def takes_input(command: str) -> bool:
    parser = COMMANDS[command]
    return bool(positionals(parser) or {a.dest for a in options(parser)} & PATH_OPTIONS)


def number_type(action: argparse.Action) -> bool:
    """Whether the option takes a number (its parser turns "1" into an int or a float)."""
    if action.choices:
        return all(isinstance(c, (int, float)) for c in action.choices)
    for sample in ("1", "0.5"):
        try:
            if action.type and isinstance(action.type(sample), (int, float)):
                return True
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            pass
    return False


def text_option(command: str) -> str | None:
    """The flag of the first option that takes free text, or None."""
    for a in options(COMMANDS[command]):
        if a.type is None and not a.choices and a.dest not in PATH_OPTIONS:
            return a.option_strings[-1]
    return None


def herd_here(args: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


def problems(code: int, err: str, args: list, must_name: tuple[str, ...] = ()) -> list[str]:
    """What is wrong with this answer to bad input (nothing: exit 2, one line, no traceback, and
    one of `must_name` in it)."""
    lines = err.strip().splitlines()
    if code == 2 and len(lines) == 1 and "Traceback" not in err and "internal error" not in err and (
            not must_name or any(n in err for n in must_name)):
        return []
    return [f"herd {' '.join(map(str, args))}: exit {code}, stderr {err.strip()[-300:]!r}"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HERD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HERD_FIND_LINKS", raising=False)
    return tmp_path


@pytest.mark.parametrize("command", sorted(c for c in COMMANDS if takes_input(c)))
def test_missing_inputs(command, home, capsys):
    args = failing_args(command, str(home / "missing"))
    assert not problems(*herd_here(args, capsys), args)


def _bad_devices() -> list[str]:
    bad = ["bogus", "cuda:99", "cuda:-1", "gpu", "meta"]
    if not torch.cuda.is_available():
        bad += ["cuda", "cuda:0"]
    if not torch.backends.mps.is_available():
        bad.append("mps")
    return bad


@pytest.mark.parametrize("command", sorted(c for c in COMMANDS
                                           if any(a.dest == "device" for a in options(COMMANDS[c]))))
def test_devices_this_machine_lacks(command, home, capsys):
    found = []
    for device in _bad_devices():
        args = failing_args(command, str(home / "missing")) + ["--device", device]
        found += problems(*herd_here(args, capsys), args, must_name=("--device",))
    assert not found, "\n".join(found)


@pytest.mark.parametrize("command", sorted(c for c in COMMANDS
                                           if any(number_type(a) for a in options(COMMANDS[c]))))
def test_bad_numbers_are_refused_by_name(command, home, capsys):
    """Every numeric option refuses "nan" (and -5, unless negative values mean something), naming
    the option, before anything is loaded."""
    found = []
    for a in filter(number_type, options(COMMANDS[command])):
        names = (*a.option_strings, a.dest, a.dest.replace("_", "-"))
        for value in ["nan"] + (["-5"] if a.dest not in NEGATIVE_OK else []):
            args = failing_args(command, str(home / "missing")) + [a.option_strings[-1], value]
            found += problems(*herd_here(args, capsys), args, must_name=names)
    assert not found, "\n".join(found)


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_a_device_from_a_recipe_or_the_python_api_is_checked_too(command, home, capsys):
    import herd

    recipe = home / "run.yaml"
    recipe.write_text("device: cuda:99\n")
    args = failing_args(command, str(home / "missing")) + ["--config", str(recipe)]
    assert not problems(*herd_here(args, capsys), args, must_name=("'cuda:99'",))
    with pytest.raises(HerdError, match="'cuda:99'"):
        herd.load(home / "missing", device="cuda:99")


def herd_process(args: list, home, stdin: bytes = b"", locale: str = "C.UTF-8") -> subprocess.CompletedProcess:
    env = {**os.environ, "HERD_HOME": str(home / "home"), "LC_ALL": locale}
    env.pop("HERD_FIND_LINKS", None)
    return subprocess.run([sys.executable, "-m", "herd", *args], input=stdin, capture_output=True,
                          env=env, timeout=120)


def utf8_case(command: str, missing: str) -> list | None:
    """The command with BAD_UTF8 as its first positional, or else as its first free-text option."""
    args = failing_args(command, missing)
    if positionals(COMMANDS[command]):
        at = len(command.split())
        return args[:at] + [BAD_UTF8] + args[at + 1:]
    flag = text_option(command)
    return None if flag is None else args + [flag, BAD_UTF8]


def test_arguments_that_are_not_utf8(home):
    """Real processes: only the operating system turns argv bytes into Python strings."""
    found = []
    for command in sorted(COMMANDS):
        args = utf8_case(command, str(home / "missing"))
        if args is None:
            continue
        r = herd_process(args, home)
        found += problems(r.returncode, r.stderr.decode(errors="replace"), args, must_name=("UTF-8",))
    assert not found, "\n".join(found)


@pytest.mark.parametrize("locale", ["C.UTF-8", "C"])  # a strict and a surrogate-escaping stdin
@pytest.mark.parametrize("command", ["generate", "guard", "chat"])
def test_standard_input_that_is_not_utf8(command, locale, home, shared):
    model = shared("models", "stories260K", "stories260K.bin")
    args = {"generate": ["generate", "-m", model], "guard": ["guard", "--print-prompt"],
            "chat": ["chat", "-m", model]}[command]
    r = herd_process(args, home, stdin=BAD_UTF8 + b"\n", locale=locale)
    assert not problems(r.returncode, r.stderr.decode(errors="replace"), args, must_name=("UTF-8",))


@pytest.mark.parametrize("error", [
    lambda: MemoryError(),
    lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB."),
    lambda: torch.empty(2**62, dtype=torch.uint8),  # raises the CPU allocator's RuntimeError, for real
], ids=["MemoryError", "CUDA", "CPU allocator"])
def test_out_of_memory_is_one_line(error, home, capsys, monkeypatch):
    def describe(model):
        raise error()

    monkeypatch.setattr("herd.info.describe", describe)
    code, err = herd_here(["info", "stories15m"], capsys)
    assert not problems(code, err, ["info"], must_name=("out of memory",))
