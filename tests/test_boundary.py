"""The dependency boundary (issue 3): the runtime works without torch, transformers and optimum.

Two proofs: a subprocess in which those modules cannot be imported loads a model directory and
generates (API and CLI); and, in CI (or with GPT2_ONNX_VENV_TEST=1), a fresh virtual environment
with only `pip install ".[cpu]"` runs `gpt2-onnx generate` and `tokenize`, and one with no
extra at all (`pip install .`) runs `--help`, `info` and `tokenize` and names the extras.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "optimum")
BLOCK = "import sys\nsys.modules.update(torch=None, transformers=None, optimum=None)\n"


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})


def test_runtime_generates_with_heavy_modules_blocked(tiny_dir: Path) -> None:
    code = BLOCK + textwrap.dedent(f"""
        import json
        from gpt2_onnx.runtime.generator import TextGenerator
        import gpt2_onnx.cli
        gen = TextGenerator.load({str(tiny_dir)!r}, device="cpu")
        res = gen.generate("Paris will", greedy=True, max_new_tokens=8)
        pieces = list(gen.stream("Paris will", seed=1, max_new_tokens=8))
        print(json.dumps(dict(ids=res.ids, prompt_ids=res.prompt_ids, text=res.text,
                              n_pieces=len(pieces))))
    """)
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["prompt_ids"] == [40313, 481]
    assert len(doc["ids"]) == 8 and doc["n_pieces"] >= 1


def test_cli_generates_with_heavy_modules_blocked(tiny_dir: Path) -> None:
    code = BLOCK + textwrap.dedent(f"""
        sys.argv = ["gpt2-onnx", "generate", {str(tiny_dir)!r}, "Paris will", "--greedy",
                    "--max-new-tokens", "5", "--json"]
        from gpt2_onnx.cli import main
        main()
    """)
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["prompt_ids"] == [40313, 481] and len(doc["ids"]) == 5


def test_nothing_heavy_is_imported_by_the_runtime(tiny_dir: Path) -> None:
    code = f"""
        import sys
        import gpt2_onnx.runtime
        import gpt2_onnx.cli
        from gpt2_onnx.runtime.generator import TextGenerator
        from gpt2_onnx.cli import app
        from typer.testing import CliRunner
        gen = TextGenerator.load({str(tiny_dir)!r}, device="cpu")
        gen.generate(["Paris will", "a"], max_new_tokens=4, seed=0, show_top=2)
        list(gen.stream("Paris will", max_new_tokens=4, seed=0))
        r = CliRunner().invoke(app, ["generate", {str(tiny_dir)!r}, "x", "--max-new-tokens", "2"])
        assert r.exit_code == 0, r.output
        # The CLI registers the export commands (gpt2_onnx.cli.export reads the builder table,
        # both light); nothing that converts or verifies is imported.
        light = {{"gpt2_onnx.export", "gpt2_onnx.export.builders"}}
        heavy = sorted(m for m in sys.modules
                       if m.split(".")[0] in {HEAVY!r} + ("onnx",)
                       or (m.startswith("gpt2_onnx.export") and m not in light))
        print(heavy)
    """
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------------------------ fresh venv


def _copy_sources(dest: Path) -> Path:
    """The repository without models, caches and build outputs (installing from a copy keeps
    pip's in-tree build from writing into the working tree)."""
    ignore = shutil.ignore_patterns(".git", "models", "build", "dist", "*.egg-info", ".venv*",
                                    "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis",
                                    ".benchmarks", "bench", ".gpt2-onnx-tmp-*")
    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


def _du_mb(path: Path) -> float:
    """Disk use in MB, as `du -sm` reports it."""
    du = subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True, timeout=120)
    return float(du.stdout.split()[0])


@pytest.mark.skipif(not (os.environ.get("CI") or os.environ.get("GPT2_ONNX_VENV_TEST") == "1"),
                    reason="installs into a fresh venv (minutes); runs in CI or with "
                           "GPT2_ONNX_VENV_TEST=1")
def test_fresh_venv_with_cpu_extra_only(tiny_dir: Path, tmp_path: Path) -> None:
    src = _copy_sources(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py, cli = venv / "bin" / "python", venv / "bin" / "gpt2-onnx"
    start = time.monotonic()
    install = subprocess.run([str(py), "-m", "pip", "install", "--no-cache-dir", "-q",
                              f"{src}[cpu]"], capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stdout + install.stderr
    install_s = time.monotonic() - start
    for heavy in ("torch", "transformers", "optimum", "optimum-onnx", "ray"):
        show = subprocess.run([str(py), "-m", "pip", "show", heavy], capture_output=True,
                              text=True, timeout=120)
        assert show.returncode != 0, f"{heavy} got installed with the cpu extra"
    gen = subprocess.run([str(cli), "generate", str(tiny_dir), "Paris will",
                          "--max-new-tokens", "5"], capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("Paris will") and len(gen.stdout) > len("Paris will\n")
    tok = subprocess.run([str(cli), "tokenize", str(tiny_dir), "Paris will"],
                         capture_output=True, text=True, timeout=120)
    assert tok.returncode == 0, tok.stderr
    assert json.loads(tok.stdout) == [40313, 481]
    size = _du_mb(venv)
    print(f"\nfresh venv with gpt2-onnx[cpu]: {size:.0f} MB, installed in {install_s:.0f} s")
    assert size < 500, f"the runtime environment grew to {size:.0f} MB"


@pytest.mark.skipif(not (os.environ.get("CI") or os.environ.get("GPT2_ONNX_VENV_TEST") == "1"),
                    reason="installs into a fresh venv (minutes); runs in CI or with "
                           "GPT2_ONNX_VENV_TEST=1")
def test_fresh_venv_base_install_without_extras(tiny_dir: Path, tmp_path: Path) -> None:
    """`pip install gpt2-onnx` alone: no onnxruntime; help names the extras, the tokenizer
    commands work, generation says which extra to add (issue 11)."""
    src = _copy_sources(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py, cli = venv / "bin" / "python", venv / "bin" / "gpt2-onnx"
    install = subprocess.run([str(py), "-m", "pip", "install", "--no-cache-dir", "-q", str(src)],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stdout + install.stderr
    for absent in ("onnxruntime", "torch"):
        show = subprocess.run([str(py), "-m", "pip", "show", absent], capture_output=True,
                              text=True, timeout=120)
        assert show.returncode != 0, f"{absent} got installed without an extra"
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(cli), *args], capture_output=True, text=True, timeout=120,
                              env=env)

    help_ = run("--help")
    assert help_.returncode == 0, help_.stderr
    assert "gpt2-onnx[cpu]" in help_.stdout and "gpt2-onnx[export]" in help_.stdout
    tok = run("tokenize", str(tiny_dir), "Paris will")
    assert tok.returncode == 0 and json.loads(tok.stdout) == [40313, 481], tok.stderr
    assert run("info", str(tiny_dir)).returncode == 0
    gen = run("generate", str(tiny_dir), "Paris will")
    assert gen.returncode == 1 and "Traceback" not in gen.stderr
    assert len(gen.stderr.strip().splitlines()) == 1 and "gpt2-onnx[cpu]" in gen.stderr
    export = run("export", "--random-init", "tiny")
    assert export.returncode == 1 and "gpt2-onnx[export]" in export.stderr


# ------------------------------------------------------------------------------ the server


def test_server_runs_with_heavy_modules_blocked(tiny_fused_dir: Path, tmp_path: Path) -> None:
    """`gpt2-onnx serve` (the serve extra on the runtime) answers a completion with torch,
    transformers, optimum and Ray unimportable, and imports nothing of the export half nor the
    Ray application (issue 14: only `--ray` needs the ray extra)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import httpx

    code = BLOCK + "sys.modules['ray'] = None\n" + textwrap.dedent("""
        import atexit
        def report():
            heavy = sorted(m for m, mod in sys.modules.items() if mod is not None  # not blocked
                           and (m.split(".")[0] in {HEAVY!r} or m.startswith("gpt2_onnx.export")
                                or m.split(".")[0] == "ray" or m == "gpt2_onnx.serve.ray_app"))
            print("HEAVY", heavy, file=sys.stderr, flush=True)
        atexit.register(report)
        from gpt2_onnx.cli import main
        sys.argv = ["gpt2-onnx", "serve", {dir!r}, "--port", "0", "--threads", "1"]
        main()
    """).replace("{HEAVY!r}", repr(HEAVY)).replace("{dir!r}", repr(str(tiny_fused_dir)))
    log = tmp_path / "server.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                                stderr=err, env={**os.environ, "COLUMNS": "300"})
        try:
            url = None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                found = [w for w in log.read_text().split() if w.startswith("http://")]
                if found:
                    url = found[0]
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        break
                time.sleep(0.05)
            assert url is not None, log.read_text()
            res = httpx.post(f"{url}/v1/completions", timeout=60,
                             json={"prompt": "Paris will", "max_tokens": 4, "temperature": 0})
            assert res.status_code == 200, res.text
            assert res.json()["usage"] == {"prompt_tokens": 2, "completion_tokens": 4,
                                           "total_tokens": 6}
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
    assert "HEAVY []" in log.read_text(), log.read_text()


@pytest.mark.skipif(not (os.environ.get("CI") or os.environ.get("GPT2_ONNX_VENV_TEST") == "1"),
                    reason="installs into a fresh venv (minutes); runs in CI or with "
                           "GPT2_ONNX_VENV_TEST=1")
def test_fresh_venv_with_serve_extra_has_no_torch(tmp_path: Path) -> None:
    src = _copy_sources(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py, cli = venv / "bin" / "python", venv / "bin" / "gpt2-onnx"
    install = subprocess.run([str(py), "-m", "pip", "install", "--no-cache-dir", "-q",
                              f"{src}[serve]"], capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stdout + install.stderr
    for heavy in ("torch", "transformers", "optimum", "optimum-onnx", "ray"):
        show = subprocess.run([str(py), "-m", "pip", "show", heavy], capture_output=True,
                              text=True, timeout=120)
        assert show.returncode != 0, f"{heavy} got installed with the serve extra"
    helped = subprocess.run([str(cli), "serve", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert helped.returncode == 0 and "--api-key" in helped.stdout, helped.stderr
    # the playground page ships as package data of the installed (not editable) package
    page = subprocess.run([str(py), "-c", "from gpt2_onnx.serve.ui import page_html; "
                           "print(page_html().count('<script>'))"], capture_output=True,
                          text=True, timeout=120)
    assert page.returncode == 0 and page.stdout.strip() == "1", page.stderr
