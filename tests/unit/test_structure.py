"""The layout of src/egspo stays readable: no import circles, no imports hidden in functions to dodge
them, and files, classes and functions of a size a newcomer can read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "egspo"
# Imported inside functions on purpose: optional or heavy dependencies only a few runs need.
OPTIONAL = ("vllm", "bitsandbytes", "matplotlib", "numpy", "pyarrow", "datasets", "peft")
MAX_FILE, MAX_CLASS, MAX_FUNCTION = 400, 250, 60


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, name: str, modules: dict[str, Path]) -> list[tuple[str, ast.AST]]:
    """(egspo module imported, the import node) for every import in `path`, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parents, base]).strip(".")
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((target, node))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {t for t, _ in _imports(path, name, modules)} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_finds_a_circle_when_there_is_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_src():
    graph = import_graph()
    assert len(graph) > 40 and "egspo.module" in graph["egspo.cli"] | {"egspo.module"}
    assert cycles(graph) == []


def test_no_egspo_import_inside_a_function():
    """Function-level imports of the project's own modules are how circles hide; none is left."""
    modules = _modules()
    hidden = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for target, inner in _imports_in(node, path, name, modules):
                    hidden.append(f"{path.relative_to(SRC)}:{inner.lineno} imports {target}")
    assert hidden == []


def _imports_in(function: ast.AST, path: Path, name: str, modules: dict[str, Path]):
    nodes = {id(n) for n in ast.walk(function) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return [(t, n) for t, n in _imports(path, name, modules) if id(n) in nodes]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_sizes_a_reader_can_follow(path):
    """Files <= 400 lines, classes <= 250, functions <= 60 unless the docstring says why ("Long:")."""
    text = path.read_text()
    assert text.count("\n") <= MAX_FILE
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        length = node.end_lineno - node.lineno + 1
        if isinstance(node, ast.ClassDef):
            assert length <= MAX_CLASS, f"class {node.name}: {length} lines"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and length > MAX_FUNCTION:
            assert "Long:" in (ast.get_docstring(node) or ""), f"{node.name}: {length} lines, no reason given"


def test_optional_dependencies_are_the_only_function_level_imports():
    allowed, found = [], []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and inner.level == 0:
                        found.append(inner.module)
                    elif isinstance(inner, ast.Import):
                        found.extend(a.name for a in inner.names)
    allowed = [m for m in found if m.split(".")[0] in OPTIONAL]
    assert sorted(set(found) - set(allowed)) == []
