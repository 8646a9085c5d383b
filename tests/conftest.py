"""Shared fixtures and helpers: small models exported once per test session, one loaded tiny
generator, private copies of a model directory to damage, and the CLI as a user meets it.

Every fixture builds what it needs (nothing large is committed): the `tiny` random-init preset and
a non-standard local checkpoint (5 layers, 4 heads, width 128, 512 positions).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The CLI as a user runs it: the `gpt2-onnx` entry point in a fresh interpreter, a wide plain
# terminal (no colour, no wrapping) so one-line errors stay one line.
CLI_LAUNCH = [sys.executable, "-c",
              "import sys; from gpt2_onnx.cli import main; sys.argv[0] = 'gpt2-onnx'; main()"]
ENV = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
ODD_SHAPE = dict(n_layer=5, n_head=4, n_embd=128, n_positions=512, initializer_range=0.3)


def export_dir(out: Path, source: str | None = None, random_init: str | None = None,
               seed: int = 0, precisions: tuple[str, ...] = ("fp32",), verify: bool = False
               ) -> Path:
    from gpt2_onnx.export.pipeline import ExportOptions, run_export

    return run_export(ExportOptions(source=source, out=out, random_init=random_init, seed=seed,
                                    precisions=precisions, verify=verify, force=True))


@pytest.fixture(scope="module")
def torch_one_thread():
    """transformers is only the reference in most tests: one thread keeps its small forwards
    fast on a shared 2-core machine (with 2 threads under load they run ~10x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """random-init tiny, seed 0, fp32 only, exported without verify."""
    return export_dir(tmp_path_factory.mktemp("tiny") / "random-tiny-seed0", random_init="tiny")


@pytest.fixture(scope="session")
def tiny_fused_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """random-init tiny, seed 0 (tiny_reference's weights), fp32 + the fused shared-KV variant
    that the engine and the server batch; exported without verify."""
    return export_dir(tmp_path_factory.mktemp("tiny-fused") / "random-tiny-seed0",
                      random_init="tiny", precisions=("fp32", "fp32-fused"))


@pytest.fixture(scope="session")
def tiny_reference():
    """The transformers model with the same weights as `tiny_dir`."""
    from gpt2_onnx.export.presets import build_random_model

    return build_random_model("tiny", 0)


def save_odd_checkpoint(path: Path, seed: int = 1) -> Path:
    """A transformers GPT-2 checkpoint folder of a shape no public GPT-2 has."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2_onnx.export.tokenizer import save_tokenizer_files

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, **ODD_SHAPE)).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    save_tokenizer_files(path, model.config.n_positions)
    return path


@pytest.fixture(scope="session")
def odd_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_odd_checkpoint(tmp_path_factory.mktemp("odd-ckpt") / "odd-gpt2")


@pytest.fixture(scope="session")
def odd_dir(tmp_path_factory: pytest.TempPathFactory, odd_checkpoint: Path) -> Path:
    """The odd-shape checkpoint exported from its local directory (fp32, no verify)."""
    return export_dir(tmp_path_factory.mktemp("odd") / "odd-gpt2", source=str(odd_checkpoint))


@pytest.fixture(scope="session")
def odd_reference(odd_checkpoint: Path):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(odd_checkpoint).eval()


def interrupt_streamed_generate(launcher: list[str], model_dir: Path, text: str, sig: int,
                                code: int, prompt: str = "Paris will", n_new: int = 200,
                                n_prompts: int = 400) -> None:
    """Run `generate` of `n_prompts` copies of `prompt` (greedy; `text` is what one gives alone),
    send `sig` once output has streamed, and check the exit code, a one-line report, and that
    the output holds the finished prompts whole, then the interrupted one's text so far."""
    proc = subprocess.Popen([*launcher, "generate", str(model_dir), *[prompt] * n_prompts,
                             "--max-new-tokens", str(n_new), "--greedy", "--threads", "1",
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "no output within 60 s"
        first = os.read(proc.stdout.fileno(), 1 << 16)  # something has been streamed
        time.sleep(0.3)
        proc.send_signal(signal.Signals(sig))
        rest, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = (first + rest).decode("utf-8"), stderr.decode("utf-8")
    assert proc.returncode == code, err
    assert "interrupted" in err and "Traceback" not in err
    block = prompt + text + "\n"
    done = 0
    while out.startswith(block):
        out = out[len(block):]
        done += 1
    assert done < n_prompts, "the run finished before the signal; make it longer"
    if out:  # the interrupted prompt: its text so far, flushed, then a newline
        assert out.endswith("\n") and out.startswith(prompt), out[:200]
        assert text.startswith(out[len(prompt):-1]), out[:200]


# ------------------------------------------------------------------ a loaded tiny generator


@pytest.fixture(scope="session")
def tiny_gen(tiny_dir: Path):
    """The tiny export loaded once (its preferred CPU variant, one thread), shared by every test
    that only reads it; a test that changes a generator's settings loads its own."""
    from gpt2_onnx.runtime.generator import TextGenerator

    return TextGenerator.load(tiny_dir, device="cpu", threads=1)


# ------------------------------------------------------------------ model directories to damage


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path_factory.mktemp("pristine") / "model"))


def private_copy(pristine: Path, dest: Path) -> Path:
    """A copy of `pristine` whose model.onnx is a hard link (26 MB not copied per test): a test
    may damage any file in it but must never write into model.onnx."""
    def copy(src: str, dst: str) -> None:
        if Path(src).name == "model.onnx":
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)

    if dest.exists():
        shutil.rmtree(dest)
    return Path(shutil.copytree(pristine, dest, copy_function=copy))


@pytest.fixture
def model(tmp_path: Path, pristine: Path) -> Path:
    """A private copy of the tiny export (see `private_copy`)."""
    return private_copy(pristine, tmp_path / "model")


# ------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def runner():
    from typer.testing import CliRunner

    return CliRunner(env=ENV)


def invoke(runner, *args: object):
    """`gpt2-onnx ARGS` in-process; anything but a clean exit would be a user's traceback."""
    from gpt2_onnx.cli import app

    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def one_line_error(stderr: str, stdout: str = "") -> str:
    """The one `error:` line a user error prints (no traceback, nothing else on stderr)."""
    assert "Traceback" not in stderr + stdout, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:"), lines[0]
    return lines[0]


def run_cli(*args: object, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """`gpt2-onnx ARGS` as a real process (bytes arguments pass as they are; output in bytes
    unless `text=True`)."""
    return subprocess.run([*CLI_LAUNCH, *[a if isinstance(a, bytes) else str(a) for a in args]],
                          capture_output=True, timeout=timeout, env={**os.environ, **ENV},
                          **kwargs)
