"""herd's packages form layers, and imports only point down them: a reader can follow one request
or one load from the top to the bottom without going back up. Inline imports count too."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import herd

# Lowest first. A module may import from its own layer or any layer below it.
LAYERS = [
    {"herd.errors", "herd.shared", "herd.config", "herd.threads"},
    {"herd.model"},
    {"herd.quant"},  # packed layers and their kernels: what a loader builds models from
    {"herd.checkpoint", "herd.tokenizer", "herd.store"},
    {"herd.parallel"},  # tensor parallelism: sharded layers, per-rank loading, the ranks' processes
    {"herd.generate"},
    {"herd.engine"},
    {"herd.llm"},
    {"herd.serve", "herd.train", "herd.eval", "herd.bench", "herd.info", "herd.cli_args", "herd.repl"},
    {"herd.cli", "herd.__main__", "herd"},
]


def unit(module: str) -> str:
    """The layer entry a module belongs to: its package (herd.model.moe -> herd.model)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def layer(module: str) -> int:
    for i, units in enumerate(LAYERS):
        if unit(module) in units:
            return i
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS")


def imports(path: Path, module: str) -> list[tuple[str, int]]:
    """(imported herd module, line) for every import in the file, top level and inline."""
    found = []
    names = {m for _, m in modules()}
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("herd")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base == "herd" and all(a.name in ("__version__", "HerdError") for a in node.names):
                continue
            if base.startswith("herd"):
                # `from herd.quant import native` imports the module herd.quant.native
                found += sorted({(f"{base}.{a.name}" if f"{base}.{a.name}" in names else base, node.lineno)
                                 for a in node.names})
    return found


@cache
def modules() -> list[tuple[Path, str]]:
    root = Path(herd.__file__).parent
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out.append((path, ".".join(parts)))
    return out


def test_imports_point_down_the_layers():
    upward = []
    for path, module in modules():
        for target, line in imports(path, module):
            # `import herd` is for herd.load / herd.LLM (herd.llm's layer); __version__ is anyone's
            target = "herd.llm" if target == "herd" else target
            if layer(target) > layer(module):
                upward.append(f"{module}:{line} imports {target}")
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


def test_no_private_names_imported_across_modules():
    private = []
    for path, module in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("herd"):
                names = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                private += [f"{module}:{node.lineno} imports {n} from {node.module}" for n in names]
    assert not private, "private names imported from another module:\n" + "\n".join(private)


def test_no_import_cycles_between_modules():
    """Two modules that import each other (directly or round a loop) are one concern split in two."""
    graph = {module: {t for t, _ in imports(path, module) if t != module} for path, module in modules()}
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    cycles.append(" -> ".join(trail + [start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles)))


def test_functions_fit_on_a_screen():
    long = []
    for path, module in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{module}.{node.name} ({path.name}:{node.lineno}): {lines} lines")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)
