"""argparse types shared by `herd`'s commands (herd.cli) and the training commands
(herd.train.commands): each refuses a bad value in the parser, naming its option, before any work
starts."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from herd.errors import HerdError


def bounded(kind: type, low: float, high: float = math.inf, low_open: bool = False,
            high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number of `kind` (int or float) between low and high, so that a
    bad number is refused by the parser, naming its option, before any work starts."""
    what = "an integer" if kind is int else "a number"
    if math.isinf(high):
        rule = f"{what} {'>' if low_open else '>='} {low:g}"
    else:
        rule = f"{what} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}") from None
        inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not (math.isfinite(value) and inside):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    return parse


COUNT = bounded(int, 1)
NATURAL = bounded(int, 0)
POSITIVE = bounded(float, 0, low_open=True)
FRACTION = bounded(float, 0, 1, high_open=True)
PORT = bounded(int, 0, 65535)


def device_arg(text: str) -> str:
    """An argparse type: a device this machine has (the default, cpu, without importing torch)."""
    if text != "cpu":
        from herd.llm import check_device

        try:
            check_device(text)
        except HerdError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return text
