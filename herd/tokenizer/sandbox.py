"""The Jinja environment a model's chat template renders in. A template is code from a
checkpoint: Jinja's sandbox stops it from reaching Python's internals, and this module bounds
what is left, time and memory, with a one-line HerdError.

- Time: the generated code checks a deadline on entering every loop iteration, macro and
  block, and on every call; iterators returned by calls and filters check it on every item.
- Size: every value a template builds (by an operator, `~`, a literal, a call or a filter) and
  everything it writes, to its output or into a macro or `{% set %}` buffer, must stay within a
  size limit: MIN_SIZE characters, or SIZE_FACTOR times the conversation. Operations whose result
  can be far larger than their operands (repetition, powers, padding widths, format widths,
  join, replace, indent) are checked before they run, so the limit is never allocated first.

The limits are per render and per thread (the server renders in many threads).
"""

from __future__ import annotations

import inspect
import math
import re
import string
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import wraps
from typing import Any

from jinja2 import Template
from jinja2.compiler import CodeGenerator, Frame
from jinja2.nodes import Node
from jinja2.sandbox import ImmutableSandboxedEnvironment

from herd.errors import HerdError

TIME_LIMIT = 10.0  # seconds per render
MIN_SIZE = 4 << 20  # characters a template may build and write, however short the conversation...
SIZE_FACTOR = 8  # ...or this many times the conversation's size
MAX_INT_BITS = 1 << 16  # no chat template needs a larger number

# str methods whose integer arguments are the width of their result
_PADDING = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
# filters whose arguments can make the result much larger than its input: checked before they run
_GROWING_FILTERS = frozenset({"center", "indent", "batch", "slice", "tojson", "replace", "format"})
_PRINTF_WIDTH = re.compile(r"%[-+ #0]*(\d*)(?:\.(\d*))?")


class _Weights:
    """About how many characters a value prints as. A container's weight is computed once and
    kept with the container, so that its id stays its own (templates cannot mutate containers):
    a list holding the same list twice, doubled 60 times, costs 60 steps instead of 2**60. Past
    MIN_SIZE items kept, the cache starts afresh, so it never holds much more than the limit."""

    def __init__(self):
        self._known: dict[int, tuple[Any, int]] = {}
        self._kept = 0

    def __call__(self, value: Any) -> int:
        if isinstance(value, str):
            return len(value)
        if isinstance(value, int):
            return value.bit_length() // 3
        if not isinstance(value, (list, tuple, dict, set, frozenset)):
            return 0
        known = self._known.get(id(value))
        if known is not None:
            return known[1]
        if isinstance(value, dict):
            weight = sum(self(k) + self(v) for k, v in value.items())
        else:
            weight = sum(map(self, value))
        return self.remember(value, len(value) + weight)

    def remember(self, container: Any, weight: int) -> int:
        self._kept += len(container)
        if self._kept > MIN_SIZE:
            self._known.clear()
            self._kept = len(container)
        self._known[id(container)] = container, weight
        return weight


@dataclass
class _Budget:
    """One render's deadline, size limit and counts."""

    deadline: float
    inputs: Any = None  # what the size limit is relative to
    written: int = 0
    weights: _Weights = field(default_factory=_Weights)
    limit: int | None = None

    def size_limit(self) -> int:
        """Weighed when first needed: below MIN_SIZE, no check needs it."""
        if self.limit is None:
            self.limit = max(MIN_SIZE, SIZE_FACTOR * self.weights(self.inputs))
        return self.limit


class _Local(threading.local):
    budget: _Budget | None = None


def _replaced_size(text: Any, old: Any, new: Any) -> int:
    """The length of text.replace(old, new), without building it."""
    text, old, new = str(text), str(old), str(new)
    if len(new) <= len(old):
        return len(text)
    return len(text) + (text.count(old) if old else len(text) + 1) * (len(new) - len(old))


def _format_widths(fmt: str) -> list[int]:
    """The widths and precisions written in a printf- or str.format-style format string."""
    numbers = [n for m in _PRINTF_WIDTH.finditer(fmt) for n in m.groups() if n]
    if "{" in fmt:
        numbers += [n for *_, spec, _ in string.Formatter().parse(fmt) if spec for n in re.findall(r"\d+", spec)]
    return [int(n) if len(n) < 20 else math.inf for n in numbers]


def _checked_visit(visit: Callable) -> Callable:
    """A code generator visit_* method whose expression's value goes through environment.checked."""

    def checked_visit(self: CodeGenerator, node: Node, frame: Frame) -> None:
        if getattr(node, "ctx", "load") != "load":  # a tuple as an assignment target
            return visit(self, node, frame)
        self.write("environment.checked(")
        visit(self, node, frame)
        self.write(")")

    return checked_visit


class _CodeGenerator(CodeGenerator):
    """Jinja's code generator with a deadline check where every loop iteration, macro and block
    begins, counting output buffers, and the values of `~` and of literals checked."""

    def enter_frame(self, frame: Frame) -> None:
        self.writeline("environment.tick()")
        super().enter_frame(frame)

    def buffer(self, frame: Frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.output_buffer()")

    visit_Concat = _checked_visit(CodeGenerator.visit_Concat)
    visit_List = _checked_visit(CodeGenerator.visit_List)
    visit_Tuple = _checked_visit(CodeGenerator.visit_Tuple)
    visit_Dict = _checked_visit(CodeGenerator.visit_Dict)


class _Buffer(list):
    """The output of a macro, a `{% set %}` block or a filter block, counted as it is written."""

    def __init__(self, wrote: Callable[[int], None]):
        super().__init__()
        self._wrote = wrote

    def append(self, text: str) -> None:
        self._wrote(len(text))
        super().append(text)

    def extend(self, texts) -> None:
        texts = tuple(texts)
        self._wrote(sum(map(len, texts)))
        super().extend(texts)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with a time limit and a size limit on each render (see the
    module's docstring); `filters` and `globals` are added to Jinja's defaults, less `lipsum`
    (a loop no chat template needs, which the checks could not reach)."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, filters: dict[str, Callable], globals: dict[str, Any], **options):
        super().__init__(**options)
        self.globals.pop("lipsum", None)
        self.globals.update(globals)
        filters = {**self.filters, **filters, "join": self._bounded_join(self.filters["join"])}
        self.filters = {name: self._bounded_filter(name, f) for name, f in filters.items()}
        self._local = _Local()

    def template(self, source: str) -> Template:
        """`source` compiled; Jinja runs constant filters while compiling, hence the limits."""
        with self._limits(None):
            return self.from_string(source)

    def render(self, template: Template, **context) -> str:
        """`template` rendered with `context`, within the limits."""
        with self._limits(list(context.values())):
            out = []
            written = 0
            for text in template.root_render_func(template.new_context(context)):
                written += len(text)
                if written > MIN_SIZE:
                    self._check(written)
                out.append(text)
            return "".join(out)

    @contextmanager
    def _limits(self, inputs: Any) -> Iterator[None]:
        self._local.budget = _Budget(time.monotonic() + TIME_LIMIT, inputs)
        try:
            yield
        finally:
            self._local.budget = None

    def _budget(self) -> _Budget:
        return self._local.budget or _Budget(math.inf)

    # -- called by the generated code

    def tick(self) -> None:
        budget = self._local.budget
        if budget is not None and time.monotonic() > budget.deadline:
            raise HerdError(f"chat template: rendering ran past the time limit of {TIME_LIMIT:g} s")

    def output_buffer(self) -> _Buffer:
        return _Buffer(self.wrote)

    def wrote(self, n: int) -> None:
        budget = self._local.budget
        if budget is not None:  # else compiling, which writes nothing
            budget.written += n
            self._check(budget.written)

    def checked(self, value: Any) -> Any:
        """`value` once its size is checked; an iterator checks each item as it is drawn."""
        if isinstance(value, str):
            if len(value) > MIN_SIZE:
                self._check(len(value))
        elif isinstance(value, Iterator):
            return self._counted(value)
        else:
            self._check(self._budget().weights(value))
        return value

    # -- the sandbox's hooks

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        """Sizes are checked before the operation; a container's weight is then known, not recounted."""
        if operator == "+" and isinstance(left, str) and isinstance(right, str):  # the common case, made fast
            if len(left) + len(right) > MIN_SIZE:
                self._check(len(left) + len(right))
            return left + right
        weights = self._budget().weights
        size = None
        if isinstance(left, int) and isinstance(right, int):
            self._check_bits(operator, left, right)
        elif operator == "+" and isinstance(left, (str, list, tuple)) and type(left) is type(right):
            size = weights(left) + weights(right)
        elif operator == "*" and isinstance(left, int) != isinstance(right, int):
            count, seq = (left, right) if isinstance(left, int) else (right, left)
            size = weights(seq) * count
        elif operator == "%" and isinstance(left, str):
            self._check_count(*_format_widths(left))
        if size is None:
            return self.checked(super().call_binop(context, operator, left, right))
        self._check(size)
        result = super().call_binop(context, operator, left, right)
        if isinstance(result, (list, tuple)):
            weights.remember(result, size)
        return result

    def call(self, context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.tick()
        text = getattr(obj, "__self__", None)
        if isinstance(text, str):
            args = self._check_str_call(text, obj.__name__, args, kwargs)
        return self.checked(super().call(context, obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapper = super().wrap_str_format(value)
        if wrapper is not None:
            self._check_count(*_format_widths(value.__self__))
        return wrapper

    # -- checks

    def _check(self, size: float) -> None:
        if size <= MIN_SIZE:
            return
        limit = self._budget().size_limit()
        if size > limit:
            raise HerdError(f"chat template: it builds more than {limit} characters, the size limit "
                            f"({MIN_SIZE} or {SIZE_FACTOR} x the conversation)")

    def _check_count(self, *values: Any) -> None:
        """Integer arguments that are a result's width or count."""
        self._check(max((v for v in values if isinstance(v, (int, float))), default=0))

    def _check_bits(self, operator: str, left: int, right: int) -> None:
        bits = {"+": max(left.bit_length(), right.bit_length()) + 1,
                "*": left.bit_length() + right.bit_length(),
                "**": left.bit_length() * right if right > 0 and abs(left) > 1 else 0}.get(operator, 0)
        if bits > MAX_INT_BITS:
            raise HerdError(f"chat template: a number over {MAX_INT_BITS} bits, the size limit for numbers")

    def _check_str_call(self, text: str, name: str, args: tuple, kwargs: dict) -> tuple:
        """Check a str method call that can grow; `args`, an iterable to join drawn into a list."""
        if name in _PADDING:
            self._check_count(*args, *kwargs.values())
        elif name == "replace" and len(args) >= 2:
            self._check(_replaced_size(text, *args[:2]))
        elif name == "join" and len(args) == 1:
            args = (list(args[0]),)
            self._check(self._joined_size(args[0], text))
        return args

    def _joined_size(self, items: list, separator: Any) -> int:
        weights = self._budget().weights
        return sum(map(weights, items)) + len(str(separator)) * len(items)

    def _bounded_filter(self, name: str, f: Callable) -> Callable:
        """`f` with its result checked, and its arguments first if it is a growing filter."""
        params = tuple(inspect.signature(f).parameters) if name in _GROWING_FILTERS else None

        @wraps(f)
        def bounded(*args: Any, **kwargs: Any) -> Any:
            if params is not None:
                self._check_filter(name, dict(zip(params, args), **kwargs))
            return self.checked(f(*args, **kwargs))

        return bounded

    def _bounded_join(self, join: Callable) -> Callable:
        """Jinja's join filter, its result's size checked before it is built."""

        @wraps(join)
        def bounded_join(eval_ctx, value: Any, d: str = "", attribute: Any = None) -> str:
            value = list(value)
            self._check(self._joined_size(value, d))
            return join(eval_ctx, value, d, attribute)

        return bounded_join

    def _check_filter(self, name: str, arguments: dict[str, Any]) -> None:
        """Check a growing filter's arguments, named as its parameters are."""
        if name == "replace":
            self._check(_replaced_size(arguments["s"], arguments["old"], arguments["new"]))
        elif name == "format":
            self._check_count(*_format_widths(str(arguments["value"])))
        elif name == "indent":  # the width (a count of spaces or a string) goes after every newline
            width = arguments.get("width", 4)
            self._check_count(width)
            self._check(_replaced_size(arguments["s"], "\n", "\n" + (width if isinstance(width, str) else " " * width)))
        else:
            self._check_count(*(v for k, v in arguments.items() if k not in ("value", "s")))

    def _counted(self, items: Iterator) -> Iterator:
        total = 0
        weights = self._budget().weights
        for item in items:
            self.tick()
            total += 1 + weights(item)
            self._check(total)
            yield item
