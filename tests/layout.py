"""Read the package's shape from its source: imports (function-local ones included), sizes.

Used by ``tests/test_layout.py`` and runnable as a script to print the counts quoted in issue notes:
``python -m tests.layout``.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "tl_backward"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# Layers, lowest first. A module may import from its own folder and from any layer below its own.
LAYERS: dict[str, int] = {
    "errors": -1, "zoo": 0,          # zoo is data: shipped models, their tokenizer and world
    "core": 1, "render": 1,
    "attention": 2, "lens": 2, "flow": 2, "masking": 2,
    "report": 3,
    "cli": 4, "__init__": 4,
}


@dataclass(frozen=True)
class Import:
    source: str       # importing module, dotted
    target: str       # imported module, dotted (resolved; `from pkg import sub` counts as pkg.sub)
    line: int
    local: bool       # inside a function or method body


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(mod: str, path: Path, known: set[str]) -> list[Import]:
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == PACKAGE:
                        found.append(Import(mod, alias.name, child.lineno, local))
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(mod, is_pkg, child)
                if target.split(".")[0] != PACKAGE:
                    continue
                for alias in child.names:
                    sub = f"{target}.{alias.name}"
                    found.append(Import(mod, sub if sub in known else target, child.lineno, local))
            visit(child, inner)

    visit(tree, False)
    return found


def all_imports() -> list[Import]:
    mods = modules()
    known = set(mods)
    return [imp for mod, path in mods.items() for imp in imports_of(mod, path, known)]


def _edge_target(target: str, known: set[str]) -> str:
    while target not in known and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected components of size > 1 (Tarjan), package ``__init__`` re-exports excluded."""
    known = set(modules())
    graph: dict[str, set[str]] = {m: set() for m in known}
    for imp in imports:
        tgt = _edge_target(imp.target, known)
        # A package's __init__ re-exporting its children is not a dependency of the children on it.
        if tgt != imp.source and not imp.source.startswith(tgt + ".") and not tgt.startswith(imp.source + "."):
            graph[imp.source].add(tgt)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def folder(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def upward(imports: list[Import]) -> list[Import]:
    """Imports that point up the layer table, or sideways between two feature folders."""
    bad = []
    for imp in imports:
        src, tgt = folder(imp.source), folder(imp.target)
        if src == tgt or (src == "cli" and imp.target == PACKAGE):  # the CLI uses the public face
            continue
        if LAYERS.get(tgt, 99) >= LAYERS.get(src, 99):
            bad.append(imp)
    return bad


def function_lengths(path: Path) -> list[tuple[str, int]]:
    """(qualified name, body lines without the docstring) for every function in a file."""
    tree = ast.parse(path.read_text())
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = child.body
                if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                        and isinstance(body[0].value.value, str):
                    body = body[1:]
                n = (body[-1].end_lineno - body[0].lineno + 1) if body else 0
                out.append((f"{prefix}{child.name}", n))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(tree, "")
    return out


def private_imports() -> list[str]:
    """``from module import _name`` across module boundaries (private names stay in their file)."""
    out = []
    for mod, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(mod, path.name == "__init__.py", node)
                if target.split(".")[0] != PACKAGE:
                    continue
                out += [f"{mod} imports {target}.{a.name} (line {node.lineno})" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    return out


SPEC_WORDS = re.compile(r"\bspec\b(?!ial)|spec §|\w+\.md §|transformerlens4\.md|circuitsvis\.md")


def spec_citations() -> list[str]:
    """Docstrings or comments citing the external spec files, which are not in this repository."""
    out = []
    for mod, path in modules().items():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if SPEC_WORDS.search(line) and "format spec" not in line:
                out.append(f"{mod}:{i}: {line.strip()[:90]}")
    return out


# core/device.py is the one module that reads where a model lives (its docstring states the rules).
DEVICE_MODULE = f"{PACKAGE}.core.device"
# Names that hold a model, a module or a config, never a tensor, in this package's code.
MODEL_NAMES = frozenset({"model", "hf", "hf_model", "bridge", "module", "mod", "original_model", "cfg", "config",
                         "norm", "embed", "lin", "layer", "block", "attn", "mlp"})


def _tail(node: ast.AST) -> str | None:
    """The last identifier of ``a.b.c`` (``c``) or of a plain name."""
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return None


def _is_param_iter(node: ast.AST) -> bool:
    """``x.parameters()`` / ``x.buffers()`` (optionally inside ``iter(...)``)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "iter" and node.args:
        node = node.args[0]
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
        and node.func.attr in ("parameters", "buffers")


def device_reads() -> list[str]:
    """Reads of a model's device or dtype outside :data:`DEVICE_MODULE`: ``next(x.parameters())``
    (one parameter stands for the model: wrong on a dispatched model) and ``model.device`` /
    ``cfg.device`` / ``module.device`` (names in :data:`MODEL_NAMES`)."""
    return [hit for mod, path in modules().items() if mod != DEVICE_MODULE
            for hit in device_reads_in(path.read_text(), mod)]


def device_reads_in(source: str, mod: str = "<source>") -> list[str]:
    """:func:`device_reads` of one module's source text."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "next" \
                and node.args and _is_param_iter(node.args[0]):
            out.append(f"{mod}:{node.lineno}: next(...parameters()) -- use core/device.py")
        elif isinstance(node, ast.Attribute) and node.attr in ("device", "dtype") and _tail(node.value) in MODEL_NAMES:
            out.append(f"{mod}:{node.lineno}: {_tail(node.value)}.{node.attr} -- use core/device.py")
    return out


def summary() -> dict[str, object]:
    imps = all_imports()
    mods = modules()
    lines = {m: len(p.read_text().splitlines()) for m, p in mods.items()}
    funcs = [(f"{m}:{name}", n) for m, p in mods.items() for name, n in function_lengths(p)]
    longest_file = max(lines.items(), key=lambda kv: kv[1])
    longest_func = max(funcs, key=lambda kv: kv[1])
    return {
        "circles": cycles(imps),
        "upward": [f"{i.source} -> {i.target} (line {i.line})" for i in upward(imps)],
        "function_local": [f"{i.source} -> {i.target} (line {i.line})" for i in imps if i.local],
        "private_imports": private_imports(),
        "spec_citations": spec_citations(),
        "device_reads": device_reads(),
        "longest_file": longest_file,
        "longest_function": longest_func,
    }


if __name__ == "__main__":
    s = summary()
    for key, value in s.items():
        if isinstance(value, list):
            print(f"{key}: {len(value)}")
            for v in value:
                print("   ", v)
        else:
            print(f"{key}: {value}")
