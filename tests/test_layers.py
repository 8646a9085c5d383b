"""The package's layers, read from its source: imports run one way, runtime < export < serve <
cli, with no cycle between modules. Every import counts, at module level or inside a function
(a lazy import is still a dependency); a `TYPE_CHECKING` import too."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
RANK = {"runtime": 0, "export": 1, "serve": 2, "cli": 3}


def package_modules() -> dict[str, Path]:
    """Module name -> file, from pyproject's package-dir (gpt2_onnx.runtime = runtime/, ...)."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mods: dict[str, Path] = {}
    for prefix, folder in conf["package-dir"].items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join([prefix, *parts])] = path
    return mods


def import_edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (a submodule's import of its own package's
    __init__ is not counted: Python runs that __init__ first anyway)."""

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        base = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                where = node.module or ""
                if node.level:
                    pkg = base
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    where = f"{pkg}.{where}" if where else pkg
                targets = [where] + [f"{where}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                hit = resolve(target) if target.startswith("gpt2_onnx") else None
                if hit and hit != mod and not mod.startswith(hit + "."):
                    edges[mod].add(hit)
    return edges


def layer(mod: str) -> str:
    return mod.split(".")[1]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            if comp:
                found.append(sorted([v, *comp]))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_layers_are_the_four_packages() -> None:
    mods = package_modules()
    assert {layer(m) for m in mods} == set(RANK)
    assert len(mods) > 30  # the scan sees the whole package
    assert "gpt2_onnx.cli.main" in mods and "gpt2_onnx.runtime.generator" in mods


def test_no_import_cycle() -> None:
    assert cycles(import_edges(package_modules())) == []


def test_cycles_are_found() -> None:
    """The detector itself, on a hand-made graph (so the test above can fail)."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_only_run_downward() -> None:
    breaks = sorted(f"{a} imports {b}" for a, bs in import_edges(package_modules()).items()
                    for b in bs if RANK[layer(b)] > RANK[layer(a)])
    assert breaks == []


def test_nothing_imports_the_cli() -> None:
    importers = sorted(a for a, bs in import_edges(package_modules()).items()
                       if layer(a) != "cli" and any(layer(b) == "cli" for b in bs))
    assert importers == []


def test_importing_the_runtime_loads_no_higher_layer() -> None:
    code = textwrap.dedent("""
        import sys
        import gpt2_onnx.runtime
        from gpt2_onnx.runtime import TextGenerator, Engine, GenerationParams  # noqa: F401
        print(sorted(m for m in sys.modules if m.startswith(("gpt2_onnx.export",
              "gpt2_onnx.serve", "gpt2_onnx.cli"))))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
