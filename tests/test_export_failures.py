"""Export failures: an interrupted or failing export leaves nothing loadable, no temporary
litter, and an existing output (being replaced with --force) intact.

In-process tests interrupt each stage through the pipeline's `on_stage` hook with real signals
(SIGINT as Python delivers it, SIGTERM through the CLI's handler), with the optimum step replaced
by a copy of the tiny fixture's graph so each run costs milliseconds. Subprocess tests interrupt
the real `gpt2-onnx export` command.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpt2_onnx.cli import app
from gpt2_onnx.cli.common import signals_as_interrupt
from gpt2_onnx.export import pipeline
from gpt2_onnx.export.pipeline import TMP_PREFIX, ExportError, ExportOptions, run_export
from gpt2_onnx.runtime import manifest as mf
from gpt2_onnx.runtime.errors import ModelDirError
from gpt2_onnx.runtime.manifest import Variant, VariantIO

STAGES = ["load", "export", "variant-int8", "write", "verify", "rename"]
CLI = "import sys; from gpt2_onnx.cli import main; sys.argv[0] = 'gpt2-onnx'; main()"


@pytest.fixture
def fast_export(monkeypatch: pytest.MonkeyPatch, tiny_dir: Path) -> None:
    """Replace optimum's conversion by a copy of the fixture's graph (and the int8 builder by a
    stub) so that a run through every stage takes well under a second."""
    def fake_optimum(model: object, out_dir: Path) -> Variant:
        shutil.copyfile(tiny_dir / "model.onnx", out_dir / "model.onnx")
        os.chmod(out_dir / "model.onnx", 0o600)  # as optimum leaves its external data file
        return Variant("fp32", "model.onnx", (), "float32", VariantIO())

    def fake_variant(model: object, out_dir: Path, precision: str) -> Variant:
        shutil.copyfile(tiny_dir / "model.onnx", out_dir / f"model-{precision}.onnx")
        return Variant(precision, f"model-{precision}.onnx", (), "float32", VariantIO())

    monkeypatch.setattr(pipeline, "export_optimum_fp32", fake_optimum)
    monkeypatch.setattr(pipeline, "build_extra_variant", fake_variant)
    fake_verify = type(sys)("gpt2_onnx.export.verify")  # verify itself is tested elsewhere
    fake_verify.run_verify = lambda tmp, steps, reference=None: FakeReport()
    fake_verify.record_summary = lambda tmp, report: None
    monkeypatch.setitem(sys.modules, "gpt2_onnx.export.verify", fake_verify)


class FakeReport:
    passed = True


def options(out: Path, **kw: object) -> ExportOptions:
    base = dict(source=None, out=out, random_init="tiny", seed=0, force=False,
                precisions=("fp32", "int8"), verify=True)
    base.update(kw)
    return ExportOptions(**base)


def litter(parent: Path) -> list[Path]:
    return sorted(parent.glob(f"{TMP_PREFIX}*"))


def snapshot(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.iterdir())}


@pytest.fixture
def existing(tmp_path: Path, tiny_dir: Path) -> Path:
    """An existing, valid model directory at the output path (to be replaced with --force)."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "out"))


def assert_untouched(out: Path, before: dict[str, bytes] | None) -> None:
    """`out` is exactly as before (or still absent), and nothing temporary is left beside it."""
    assert litter(out.parent) == []
    if before is None:
        assert not out.exists()
    else:
        assert snapshot(out) == before
        mf.check_files(out)


def interrupt_at(stage: str, how: str):
    def hook(name: str) -> None:
        if name == stage:
            os.kill(os.getpid(), signal.SIGINT if how == "SIGINT" else signal.SIGTERM)
            time.sleep(1)  # the handler raises here, at the next bytecode
            raise AssertionError("the signal did not interrupt the export")
    return hook


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("replace", [False, True], ids=["fresh", "force-existing"])
def test_signal_at_each_stage(tmp_path: Path, fast_export: None, existing: Path, stage: str,
                              how: str, replace: bool) -> None:
    out = existing if replace else tmp_path / "fresh"
    before = snapshot(out) if replace else None
    opts = options(out, force=replace, on_stage=interrupt_at(stage, how))
    with pytest.raises(KeyboardInterrupt), signals_as_interrupt():
        run_export(opts)
    assert_untouched(out, before)


def test_fast_export_completes_without_interruption(tmp_path: Path, fast_export: None,
                                                    existing: Path) -> None:
    """Control for the stage tests: the same run, uninterrupted, replaces the directory."""
    assert "model-int8.onnx" not in mf.read_manifest(existing).files
    run_export(options(existing, force=True))
    assert mf.read_manifest(existing).variants.keys() == {"fp32", "int8"}
    assert litter(existing.parent) == []
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in existing.iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)  # readable like any other file


def test_signal_in_the_middle_of_writing(tmp_path: Path, existing: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM while the graph file is half written."""
    def half_written(model: object, out_dir: Path) -> Variant:
        with open(out_dir / "model.onnx", "wb") as f:
            f.write(b"\x08\x07" * 1000)
            f.flush()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        raise AssertionError("not interrupted")

    monkeypatch.setattr(pipeline, "export_optimum_fp32", half_written)
    before = snapshot(existing)
    with pytest.raises(KeyboardInterrupt), signals_as_interrupt():
        run_export(options(existing, force=True, precisions=("fp32",)))
    assert_untouched(existing, before)


def test_signals_deferred_holds_until_the_block_ends() -> None:
    """The final rename and the cleanup cannot be cut in half by a signal."""
    finished = False
    with pytest.raises(KeyboardInterrupt):
        with pipeline._signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            finished = True
    assert finished


# ------------------------------------------------------------------------- full disk, failures


def enospc(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["export", "tokenizer", "manifest"])
@pytest.mark.parametrize("replace", [False, True], ids=["fresh", "force-existing"])
def test_full_disk(tmp_path: Path, fast_export: None, existing: Path,
                   monkeypatch: pytest.MonkeyPatch, where: str, replace: bool) -> None:
    out = existing if replace else tmp_path / "fresh"
    before = snapshot(out) if replace else None
    if where == "export":
        def partial(model: object, out_dir: Path) -> Variant:
            (out_dir / "model.onnx").write_bytes(b"\x00" * 4096)  # written until the disk filled
            enospc()
        monkeypatch.setattr(pipeline, "export_optimum_fp32", partial)
    elif where == "tokenizer":
        def partial_tokenizer(resolved: object, out_dir: Path) -> None:
            (out_dir / "tokenizer.json").write_text('{"version": ')
            enospc()
        monkeypatch.setattr(pipeline, "write_tokenizer", partial_tokenizer)
    else:
        monkeypatch.setattr(mf.Manifest, "write", enospc)
    with pytest.raises(ExportError) as info:
        run_export(options(out, force=replace, verify=False, precisions=("fp32",)))
    msg = str(info.value)
    assert "is full" in msg and "larger disk" in msg and "\n" not in msg
    assert_untouched(out, before)


def test_full_disk_at_the_cli(tmp_path: Path, fast_export: None,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "write_tokenizer", enospc)
    out = tmp_path / "cli-out"
    result = CliRunner().invoke(app, ["export", "--random-init", "tiny", "--out", str(out),
                                      "--no-verify"])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "is full" in result.output
    assert not out.exists() and litter(tmp_path) == []


def test_failed_final_rename_restores_the_old_dir(existing: Path, fast_export: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real_rename = os.rename

    def rename(src: object, dst: object) -> None:
        if Path(src).name.startswith(TMP_PREFIX) and Path(dst) == existing:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_rename(src, dst)

    monkeypatch.setattr(pipeline.os, "rename", rename)
    before = snapshot(existing)
    with pytest.raises(ExportError, match="Nothing was written"):
        run_export(options(existing, force=True, verify=False, precisions=("fp32",)))
    assert_untouched(existing, before)


def test_unwritable_parent_is_one_clear_error(tmp_path: Path, fast_export: None) -> None:
    if os.geteuid() == 0:
        parent = Path("/proc/self/gpt2-onnx-cannot-write")  # root ignores permissions
    else:
        parent = tmp_path / "ro"
        parent.mkdir(mode=0o500)
    with pytest.raises(ExportError, match="failed"):
        run_export(options(parent / "out", verify=False, precisions=("fp32",)))


# ------------------------------------------------------------------------- --force safety


def test_force_refuses_to_delete_a_non_model_directory(tmp_path: Path, fast_export: None) -> None:
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(ExportError, match="not a gpt2-onnx model directory"):
        run_export(options(precious, force=True, verify=False, precisions=("fp32",)))
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert litter(tmp_path) == []


def test_force_keeps_a_directory_whose_only_model_trace_is_a_manifest_name(
        tmp_path: Path) -> None:
    """Issue 19.1, as reported: a file merely named gpt2-onnx.json does not make a directory
    replaceable; the real CLI refuses, names the user's file, and deletes nothing."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "gpt2-onnx.json").write_text("x\n")
    (d / "thesis.txt").write_text("keep\n")
    proc = subprocess.run(
        [sys.executable, "-c", CLI, "export", "--random-init", "tiny", "--out", str(d),
         "--force", "--no-verify"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "thesis.txt" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert (d / "thesis.txt").read_text() == "keep\n"
    assert (d / "gpt2-onnx.json").read_text() == "x\n"
    assert litter(tmp_path) == []


@pytest.mark.parametrize("extra", ["notes.txt", "runs/"], ids=["a-file", "a-sub-folder"])
def test_force_refuses_a_model_directory_holding_the_users_files(
        tmp_path: Path, fast_export: None, existing: Path, extra: str) -> None:
    """A real model directory with a note or a folder the user keeps inside: refused, the entry
    named, nothing touched; after the user moves it away, --force replaces the model."""
    if extra.endswith("/"):
        (existing / extra / "log.txt").parent.mkdir()
        (existing / extra / "log.txt").write_text("keep")
    else:
        (existing / extra).write_text("keep")
    before = {p.relative_to(existing): p.read_bytes() for p in existing.rglob("*") if p.is_file()}
    with pytest.raises(ExportError, match=extra.rstrip("/")) as err:
        run_export(options(existing, force=True, verify=False, precisions=("fp32",)))
    assert "nothing was touched" in str(err.value)
    after = {p.relative_to(existing): p.read_bytes() for p in existing.rglob("*") if p.is_file()}
    assert after == before and litter(tmp_path) == []
    shutil.move(existing / extra.rstrip("/"), tmp_path / "moved")
    run_export(options(existing, force=True, verify=False, precisions=("fp32",)))
    mf.read_manifest(existing)


def test_force_rechecks_before_the_swap(tmp_path: Path, fast_export: None,
                                        existing: Path) -> None:
    """A file the user adds while the (minutes-long) export runs is not deleted by the swap."""
    def add_note(stage: str) -> None:
        if stage == "rename":
            (existing / "added-meanwhile.txt").write_text("keep")

    with pytest.raises(ExportError, match="added-meanwhile.txt"):
        run_export(options(existing, force=True, verify=False, precisions=("fp32",),
                           on_stage=add_note))
    assert (existing / "added-meanwhile.txt").read_text() == "keep"
    mf.read_manifest(existing)  # the old model is still there, whole
    assert litter(tmp_path) == []


def test_force_replaces_a_damaged_model_directory(tmp_path: Path, fast_export: None,
                                                  existing: Path) -> None:
    """Only the files table must be readable: a truncated graph is what --force is for."""
    graph = existing / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:100])
    with pytest.raises(ModelDirError):
        mf.read_manifest(existing)
    run_export(options(existing, force=True, verify=False, precisions=("fp32",)))
    mf.read_manifest(existing)


def test_force_refuses_a_file_and_a_symlink(tmp_path: Path, fast_export: None,
                                            existing: Path) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    with pytest.raises(ExportError, match="not a gpt2-onnx model directory"):
        run_export(options(a_file, force=True, verify=False, precisions=("fp32",)))
    assert a_file.read_text() == "keep me"
    link = tmp_path / "link"
    link.symlink_to(existing)
    with pytest.raises(ExportError, match="symbolic link"):
        run_export(options(link, force=True, verify=False, precisions=("fp32",)))
    assert link.is_symlink()


def test_force_accepts_an_empty_dir_and_refusal_without_force(tmp_path: Path, fast_export: None,
                                                              existing: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    run_export(options(empty, force=True, verify=False, precisions=("fp32",)))
    mf.read_manifest(empty)
    before = snapshot(existing)
    with pytest.raises(ExportError, match="already exists; pass --force"):
        run_export(options(existing, verify=False, precisions=("fp32",)))
    assert snapshot(existing) == before


def test_default_name_of_dot_is_the_folder_name(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from gpt2_onnx.export.source import default_name

    folder = tmp_path / "my-ckpt"
    folder.mkdir()
    monkeypatch.chdir(folder)
    assert default_name(".", None, 0) == "my-ckpt"
    assert default_name("./", None, 0) == "my-ckpt"


# ------------------------------------------------------------------------- the real command


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("how, replace, moment", [
    ("SIGINT", False, "tmp"), ("SIGTERM", True, "tmp"),
    # Signalled while optimum writes (~20 s each on 2 busy cores; run with -m slow).
    pytest.param("SIGTERM", False, "optimum", marks=pytest.mark.slow),
    pytest.param("SIGINT", True, "optimum", marks=pytest.mark.slow),
])
def test_real_export_interrupted(tmp_path: Path, tiny_dir: Path, how: str, replace: bool,
                                 moment: str) -> None:
    """`gpt2-onnx export` killed by a signal once its temporary directory exists (or once
    optimum is writing into it): exit code != 0, nothing loadable, no litter, old dir intact."""
    out = tmp_path / "X"
    before = None
    if replace:
        shutil.copytree(tiny_dir, out)
        before = snapshot(out)
    cmd = [sys.executable, "-c", CLI, "export", "--random-init", "tiny", "--out", str(out),
           "--no-verify", *(["--force"] if replace else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def started() -> bool:
            tmps = [p for p in litter(tmp_path) if "-old-" not in p.name]
            if moment == "tmp":
                return bool(tmps)
            return any((t / "optimum-raw").exists() for t in tmps)

        assert wait_for(started, 120), "the export never reached the expected moment"
        proc.send_signal(signal.SIGINT if how == "SIGINT" else signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, stderr
    # main() maps Ctrl-C to 130 and SIGTERM to 143 (128 + the signal), as shells do.
    assert proc.returncode == (130 if how == "SIGINT" else 143), stderr
    assert "Traceback" not in stderr, stderr
    assert_untouched(out, before)
    if before is None:
        with pytest.raises(ModelDirError):
            mf.read_manifest(out)


def test_killed_exports_temporaries_are_removed_by_the_next_export(
        tmp_path: Path, fast_export: None) -> None:
    """SIGKILL cannot be caught: the next export of the same output removes what a dead export
    on this host left, and nothing of a live one, another host's, or an interrupted swap."""
    import socket

    out = tmp_path / "out"
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid no longer runs
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f"{TMP_PREFIX}out-{host}-{dead.pid}-abc"
        live = tmp_path / f"{TMP_PREFIX}out-{host}-{alive.pid}-def"
        other_host = tmp_path / f"{TMP_PREFIX}out-elsewhere.example-{dead.pid}-ghi"
        swap = tmp_path / f"{TMP_PREFIX}out-old-jkl"
        for d in (stale, live, other_host, swap):
            (d / "model.onnx").parent.mkdir()
            (d / "model.onnx").write_bytes(b"partial")
        run_export(options(out))
        assert not stale.exists()
        assert live.exists() and other_host.exists() and swap.exists()
        assert mf.read_manifest(out).variants.keys() == {"fp32", "int8"}
    finally:
        alive.kill()
        alive.wait()
