"""The README's set-up is what CI runs, and it installs everything the project's own scripts and
tests import (issue 31: the quick benchmark once died on a fresh machine for want of matplotlib,
which only a hand install had provided on the machines where CI passed)."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Imported only by the benchmark's peers, which the `bench` extra (ctranslate2) and
# bench/llama_setup.py (llama.cpp's bindings and gguf-py, from the llama-cpp-python sdist, on
# PYTHONPATH) bring; the quick benchmark and the default suite never import them.
PEERS_ONLY = {"ctranslate2": "bench extra", "llama_cpp": "bench/llama_setup.py",
              "gguf": "bench/llama_setup.py"}


def readme_setup_commands() -> list[str]:
    """The commands of the README's "Set up and test" block, comments dropped."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Set up and test"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README's 'Set up and test' section has no bash block"
    return [cmd for line in block.group(1).splitlines() if (cmd := strip_comment(line))]


def strip_comment(line: str) -> str:
    """A shell line without its trailing `# comment` (none of these lines quote a '#')."""
    return line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""


def ci_commands() -> list[str]:
    return [cmd for line in (ROOT / ".ci" / "run").read_text().splitlines()
            if (cmd := strip_comment(line))]


def test_ci_runs_the_readme_setup_line_for_line_in_a_fresh_venv() -> None:
    readme = readme_setup_commands()
    ci = ci_commands()
    assert any(c.startswith("python3 -m venv --clear .venv") for c in readme), readme
    assert any(c.startswith("pytest") for c in readme), readme
    # the README's commands, in their order, are .ci/run's (which adds only shell set-up and a
    # timing line around them)
    positions = [ci.index(c) if c in ci else -1 for c in readme]
    missing = [c for c, i in zip(readme, positions, strict=True) if i < 0]
    assert not missing, f".ci/run lacks the README's set-up commands: {missing}"
    assert positions == sorted(positions), "the README's set-up runs in another order in CI"
    # nothing is installed outside the fresh environment: every pip call comes after it
    venv_at = positions[[i for i, c in enumerate(readme) if "-m venv" in c][0]]
    assert all(i > venv_at for i, c in enumerate(ci) if c.startswith("pip ")), ci


def imported_modules() -> dict[str, set[str]]:
    """Top-level module -> files, for every absolute import in the package, bench/, docs/ and
    tests/ (function-level imports included)."""
    local = {p.stem for d in ("bench", "tests", "docs") for p in (ROOT / d).glob("*.py")}
    found: dict[str, set[str]] = {}
    for folder in ("bench", "docs", "tests", "export", "runtime", "serve", "cli"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in local and top not in sys.stdlib_module_names:
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_module_the_project_imports_is_installed_by_the_setup_line() -> None:
    """Run under the README's set-up (CI's fresh venv), this fails on any import that only a
    hand-installed package satisfies."""
    found = imported_modules()
    assert {"numpy", "onnxruntime", "tokenizers", "matplotlib"} <= set(found)  # the scan works
    missing = {m: sorted(files)[:3] for m, files in found.items()
               if m not in PEERS_ONLY and m != "gpt2_onnx" and importlib.util.find_spec(m) is None}
    assert not missing, ("imported but not installed by the README's set-up line (add it to an "
                         f"extra the set-up installs, or import it only where it is optional): "
                         f"{missing}")
