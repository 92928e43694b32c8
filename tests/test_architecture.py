"""The shape of the code: no import circle, imports inside functions only with a stated reason, short files,
a config layer that imports no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = {"moeconv": ROOT / "moeconv", "moeconv.cli": ROOT / "cli"}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    found = {}
    for prefix, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [*prefix.split("."), *path.relative_to(folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, ast.stmt, bool]]:
    """(imported moeconv module, the statement, whether it sits inside a function) for every import in the file."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top = {id(n) for n in tree.body} | {id(c) for n in tree.body if isinstance(n, ast.Try | ast.If) for c in ast.walk(n)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            targets = subs + ([base] if len(subs) < len(node.names) else [])  # `from pkg import submodule` needs the submodule
        else:
            continue
        out += [(t, node, id(node) not in top) for t in targets if t in modules and t != module]
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_even_through_imports_inside_functions():
    modules = _modules()
    graph = {m: {t for t, _, _ in _imports(m, p, modules)} for m, p in modules.items()}
    assert _cycles(graph) == []


def test_the_walker_sees_a_circle(tmp_path):
    """The check can fail: a two-module circle through a function-level import is found."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def _explained(lines: list[str], node: ast.stmt) -> bool:
    """A comment on the import's own lines or on the line just above it."""
    return any("#" in lines[i] for i in range(node.lineno - 2, node.end_lineno))


# Copied verbatim into every checkpoint (a change there changes every output's bytes): their function-level imports
# load dag.py / quant_linear.py only for checkpoints that have an aggregator or quantized linears.
VERBATIM = ROOT / "moeconv" / "modeling" / "hf"


def test_imports_inside_functions_say_why():
    modules = {m: p for m, p in _modules().items() if VERBATIM not in p.parents}
    unexplained = []
    for module, path in modules.items():
        lines = path.read_text().splitlines()
        for target, node, inner in _imports(module, path, modules):
            if inner and not _explained(lines, node):
                unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}")
    for path in [p for folder in PACKAGES.values() for p in folder.rglob("*.py") if VERBATIM not in p.parents]:
        tree = ast.parse(path.read_text())
        lines = path.read_text().splitlines()
        for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]:
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom) and not _explained(lines, node):
                    unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert sorted(set(unexplained)) == []


def test_no_source_file_over_400_lines():
    sources = [p for folder in [*PACKAGES.values(), ROOT / "tests", ROOT / "benchmarks"] for p in folder.rglob("*.py")]
    sources += list((ROOT / "csrc").rglob("*.c*")) + list((ROOT / "csrc").rglob("*.h"))
    long = {str(p.relative_to(ROOT)): n for p in sources if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_config_layer_imports_no_torch():
    code = "import sys, moeconv.config; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
