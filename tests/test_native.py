"""The C binding's contract (herd/quant/csrc/): the library's struct layouts agree with native.py's
ctypes Structures, the instruction-set code stays in its own files, and the C functions stay short."""

import ctypes
import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

from herd.quant import native

needs_kernels = pytest.mark.skipif(native.library() is None, reason="no C compiler to build herd's kernels")
ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for p in native.SOURCES.rglob("*") if p.suffix in (".c", ".h"))
MAX_LINES = 80


@needs_kernels
def test_the_library_agrees_with_the_structures():
    native.check_layout(native.library())  # load() checked it already; here a failure names the field


@needs_kernels
@pytest.mark.parametrize("name, fields, complaint", [
    ("Step", [(f, ctypes.c_int64 if f == "threads" else t) for f, t in native.Step._fields_], "Step.threads"),
    ("Step", [native.Step._fields_[0], native.Step._fields_[2], native.Step._fields_[1]] + native.Step._fields_[3:],
     r"Step\.B: \(offset, size\) \(8, 8\) in C, \(16, 8\) in Python"),
    ("Linear", native.Linear._fields_[:-1], r"Linear\.m: .* in C, missing in Python"),
    ("Linear", native.Linear._fields_ + [("extra", ctypes.c_int)], r"Linear\.extra: .*missing in C"),
    ("Nothing", native.Linear._fields_, "disagree on Nothing"),
])
def test_a_structure_that_disagrees_with_the_library_is_refused(name, fields, complaint):
    """A wider field, two fields swapped, a field missing on either side, a struct C lacks."""
    wrong = type(name, (ctypes.Structure,), {"_fields_": fields})
    with pytest.raises(RuntimeError, match=complaint):
        native.check_layout(native.library(), {name: wrong})


def _code(text: str) -> str:
    """C text without comments, strings and character literals (their braces are not code)."""
    return re.sub(r'/\*.*?\*/|//[^\n]*|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'',
                  lambda m: "\n" * m.group().count("\n"), text, flags=re.S)


def top_level_blocks(text: str) -> list[tuple[int, int]]:
    """(first line, number of lines) of each top-level braced block: functions, and structs, tables
    and macros that define functions."""
    blocks, depth, start = [], 0, 0
    for number, line in enumerate(_code(text).splitlines(), 1):
        for char in line:
            if char == "{":
                depth, start = depth + 1, number if depth == 0 else start
            elif char == "}":
                depth -= 1
                if depth == 0:
                    blocks.append((start, number - start + 1))
    return blocks


def test_the_block_finder():
    text = 'int f(void) {\n  if (x) { y("}"); }\n  /* } */\n  return 0;\n}\n#define M(a) \\\n  { a; }\n'
    assert top_level_blocks(text) == [(1, 5), (7, 1)]


def test_no_c_function_is_long():
    long = [f"{p.relative_to(ROOT)}:{start} ({n} lines)" for p in SOURCES
            for start, n in top_level_blocks(p.read_text()) if n > MAX_LINES]
    assert not long, f"C blocks over {MAX_LINES} lines: {long}"


def test_intrinsics_only_in_the_instruction_set_files():
    """The code for one instruction set lives in csrc/avx2/ or csrc/avx512/; the generic files only
    choose it."""
    outside = [str(p.relative_to(native.SOURCES)) for p in SOURCES
               if p.parent.name not in ("avx2", "avx512") and re.search(r"\b_mm\w*|__m256|__m512", _code(p.read_text()))]
    assert not outside


def test_the_sources_are_package_data():
    """A wheel without the C sources would silently fall back to the slow torch code."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["herd.quant"]
    package = native.SOURCES.parent
    assert all(any(fnmatch(str(p.relative_to(package)), g) for g in globs) for p in SOURCES)
