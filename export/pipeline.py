"""Export as one fixed sequence: refuse/prepare output -> resolve source -> check disk -> export
ONNX -> extra variants -> tokenizer and configs -> manifest -> verify -> rename into place.

Everything is written into a temporary sibling directory that is renamed into place only when
complete, so an interrupted or failed export leaves nothing loadable and no litter, and with
`force` an existing directory stays intact until its replacement is complete.

The top of the export package's graph modules: it runs the builders (builders.py, which run
fused.py and fp16.py), and they and it share the graph edits of graph_edit.py; none of those
imports this module.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from gpt2_onnx.export import graph_edit
from gpt2_onnx.export.builders import builder_for, exportable
from gpt2_onnx.export.fp16 import build_fp16_variant
from gpt2_onnx.export.graph_edit import LAST_LOGITS
from gpt2_onnx.export.source import ResolvedSource, default_name, resolve_source, write_tokenizer
from gpt2_onnx.runtime import variants as registry
from gpt2_onnx.runtime.errors import Gpt2OnnxError
from gpt2_onnx.runtime.manifest import (
    FORMAT_NAME,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    FileEntry,
    Manifest,
    ModelDims,
    Variant,
    VariantIO,
    file_entries,
    graph_external_data,
    package_versions,
    read_manifest,
    safe_child,
)

TMP_PREFIX = ".gpt2-onnx-tmp-"
# What the default export writes: optimum's fp32 graph (verify's reference) and the fused fp32
# graph the runtime prefers on CPU (same numbers, faster). Others: runtime/variants.py.
DEFAULT_PRECISIONS = ("fp32", "fp32-fused")


class ExportError(Gpt2OnnxError):
    """The export cannot proceed (existing output, disk space, failed conversion)."""


class Progress(Protocol):
    """Where the pipeline reports its stages (the CLI passes a rich implementation)."""

    def stage(self, name: str) -> contextlib.AbstractContextManager[None]: ...

    def done(self, out_dir: Path, files: dict[str, int], seconds: float) -> None: ...


class NullProgress:
    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        yield

    def done(self, out_dir: Path, files: dict[str, int], seconds: float) -> None:
        pass


@dataclass
class ExportOptions:
    source: str | None = "gpt2-large"
    out: Path | None = None  # default: models/<name>
    random_init: str | None = None
    seed: int = 0
    force: bool = False
    precisions: Sequence[str] = DEFAULT_PRECISIONS
    verify: bool = True
    verify_steps: int = 16
    # The variant genai_config.json points at (onnxruntime-genai); None: the fastest exported
    # one (the registry's genai_rank, runtime/variants.py).
    genai_variant: str | None = None
    # Test hook: called with the stage name before each stage (simulating interruptions).
    on_stage: Callable[[str], None] | None = field(default=None, repr=False)


def output_dir(opts: ExportOptions) -> Path:
    if opts.out is not None:
        return Path(opts.out)
    return Path("models") / default_name(opts.source, opts.random_init, opts.seed)


def run_export(opts: ExportOptions, progress: Progress | None = None) -> Path:
    """Export per `opts`; returns the final model directory. Raises on any failure, leaving the
    previous state of the output path untouched and no temporary directory behind."""
    progress = progress or NullProgress()
    supported = exportable()
    bad = [p for p in opts.precisions if p not in supported]
    if bad or not opts.precisions:
        raise ValueError(f"precision {bad or '(none)'}: choose from {', '.join(supported)}")
    if "fp32" not in opts.precisions:
        raise ValueError("precision: fp32 is always exported (verify compares against it); "
                         "add the others beside it, e.g. --precision fp32,int8")
    if opts.random_init is None and not opts.source:
        raise ValueError("source: give a hub id, a local directory, or --random-init PRESET")
    from gpt2_onnx.export.genai import choose_genai_variant

    genai_variant = choose_genai_variant(opts.precisions, opts.genai_variant)  # refused early
    out = output_dir(opts)
    _check_replaceable(out, opts.force)
    start = time.perf_counter()
    try:
        _export_into_place(replace(opts, genai_variant=genai_variant), progress, out)
    except OSError as exc:
        raise _os_error(exc, out) from exc
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    progress.done(out, sizes, time.perf_counter() - start)
    return out


def _check_replaceable(out: Path, force: bool) -> None:
    """Refuse an existing output without `force`; with it, refuse anything but an empty directory
    or a model directory holding only what its export wrote (the files its manifest lists):
    `--force` must never delete a file the user put there."""
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise ExportError(f"{out} already exists; pass --force to replace it "
                          "(the old directory stays until the new one is complete).")
    if out.is_symlink():
        raise ExportError(f"{out} is a symbolic link; refusing to replace it. Pass its target "
                          f"({os.path.realpath(out)}) as --out to replace the model there.")
    if not out.is_dir():
        raise ExportError(f"{out} exists and is not a gpt2-onnx model directory (a file); "
                          "refusing to replace it even with --force. Choose another --out, or "
                          "remove it yourself.")
    listed = _listed_files(out / MANIFEST_NAME)
    unknown = _foreign_entries(out, listed)
    if not unknown:
        return
    names = ", ".join(repr(n) for n in unknown[:10]) + (
        f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
    what = ("is not a gpt2-onnx model directory (no valid manifest)" if listed is None else
            "holds entries no export wrote (not in its manifest's files)")
    raise ExportError(
        f"{out} {what}: {names}. --force replaces only what an export wrote; nothing was "
        "touched. Move those elsewhere, choose another --out, or remove the directory yourself.")


def _foreign_entries(out: Path, listed: set[str] | None) -> list[str]:
    """Entries of `out` that no export wrote: everything but the manifest and the plain files
    `listed` by its `files` table (every entry when there is no readable manifest: None)."""
    entries = sorted(p.name for p in out.iterdir())
    if listed is None:
        return entries
    return [name for name in entries
            if name != MANIFEST_NAME and not (name in listed and _plain_file(out / name))]


def _listed_files(manifest_path: Path) -> set[str] | None:
    """The names a gpt2-onnx manifest's `files` table lists; None if there is none. Lenient about
    the rest of the manifest, so a damaged model directory can still be replaced."""
    try:
        if not _plain_file(manifest_path) or manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        doc = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        return None
    files = doc.get("files")
    if not isinstance(files, dict):
        return None
    return {name for name in files if isinstance(name, str)}


def _plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _os_error(exc: OSError, out: Path) -> ExportError:
    """One line for a failed write: a full disk, permissions, a vanished directory."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ExportError(
            f"the disk holding {out.parent.resolve()} is full ({exc.strerror}). Nothing was "
            f"written and {out} is as it was; free space or pass --out on a larger disk.")
    where = f" ({exc.filename})" if exc.filename else ""
    return ExportError(f"writing {out} failed: {exc.strerror or exc}{where}. Nothing was "
                       f"written and {out} is as it was.")


def _export_into_place(opts: ExportOptions, progress: Progress, out: Path) -> None:
    """The fixed sequence, inside a temporary sibling renamed to `out` only when complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with _temporary_sibling(out) as tmp:
        _stage(opts, "load")
        with progress.stage("load checkpoint"):
            resolved = resolve_source(opts.source, opts.random_init, opts.seed)
        _check_disk(resolved.model, out.parent, opts.precisions, opts.genai_variant)
        _stage(opts, "export")
        with progress.stage("export ONNX (optimum, fp32 with KV cache)"):
            variants = {"fp32": export_optimum_fp32(resolved.model, tmp)}
        for precision in opts.precisions:
            if precision == "fp32":
                continue
            _stage(opts, f"variant-{precision}")
            with progress.stage(f"build {precision} variant"):
                variants[precision] = build_extra_variant(resolved.model, tmp, precision)
        _stage(opts, "write")
        with progress.stage("write tokenizer, configs, manifest"):
            write_tokenizer(resolved, tmp)
            resolved.model.config.save_pretrained(tmp)
            resolved.model.generation_config.save_pretrained(tmp)
            genai = write_genai(tmp, resolved, variants, opts.genai_variant)
            manifest = build_manifest(out.name, resolved, variants, tmp, genai)
            manifest.write(tmp)
        if opts.verify:
            _stage(opts, "verify")
            with progress.stage("verify against transformers"):
                from gpt2_onnx.export.verify import record_summary, run_verify

                # The model just converted is the reference: no second copy in memory.
                report = run_verify(tmp, steps=opts.verify_steps, reference=resolved.model)
                record_summary(tmp, report)
                if not report.passed:
                    raise ExportError(verify_failure_message(report, opts.precisions))
        del resolved
        _stage(opts, "rename")
        with _signals_deferred():
            _move_into_place(tmp, out)


def _is_exact(precision: str) -> bool:
    """See VariantSpec.exact (False for a name the registry does not know)."""
    try:
        return registry.get(precision).exact
    except ValueError:
        return False


def verify_failure_message(report: Any, precisions: Sequence[str]) -> str:
    """One line for an export refused by verify. A quantized variant below its quality bar is
    named with its figures and what to do (export without it, or keep it with --no-verify and
    measure it); a failing exact variant is a defect to report."""
    failed = [c for c in report.checks if not c.passed]
    exact = [c for c in failed if _is_exact(c.variant)]
    lossy = sorted({c.variant for c in failed if not _is_exact(c.variant)})
    parts = []
    if lossy:
        figures = []
        for variant in lossy:
            mine = [c for c in failed if c.variant == variant]
            figures.append(f"{variant} fails {', '.join(c.check for c in mine)}; "
                           f"{mine[0].check}: {mine[0].figure} (limit {mine[0].threshold})")
        keep = [p for p in precisions if p not in lossy and p not in {c.variant for c in exact}]
        these = "this variant's" if len(lossy) == 1 else "these variants'"
        parts.append(
            f"{', '.join(lossy)}: {these} quality on this model is below the bar verify holds "
            f"it to ({'; '.join(figures)}); the limits were measured on a trained model and "
            "small or random-weight models can miss them. Export without it (--precision "
            f"{','.join(keep or ['fp32'])}), or keep it with --no-verify and measure it on your "
            "own text with `gpt2-onnx score --precision ...`")
    if exact:
        parts.append(
            f"{', '.join(f'{c.variant}/{c.check}: {c.figure}' for c in exact)}: an exact "
            "variant differs from PyTorch, which is a defect of the export; please report it "
            "(rerun with --no-verify to inspect the directory)")
    return f"verify failed. {' | '.join(parts)}. Nothing was written."


def _stage(opts: ExportOptions, name: str) -> None:
    """The test hook: called before each stage (simulated interruptions)."""
    if opts.on_stage is not None:
        opts.on_stage(name)


@contextlib.contextmanager
def _temporary_sibling(out: Path) -> Iterator[Path]:
    """A fresh directory beside `out` (same filesystem, so the final rename is atomic), removed
    on any failure or interruption (KeyboardInterrupt and SystemExit included)."""
    _remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(out), dir=out.parent))
    try:
        yield tmp
    finally:
        with _signals_deferred():  # a second Ctrl-C must not stop the cleanup halfway
            shutil.rmtree(tmp, ignore_errors=True)


def _tmp_prefix(out: Path) -> str:
    """Temporary directories carry host and pid, so a later export can tell a dead one's."""
    return f"{TMP_PREFIX}{out.name}-{socket.gethostname()}-{os.getpid()}-"


def _remove_stale_temporaries(out: Path) -> None:
    """Remove temporary directories that an export of `out` on this host left behind when it
    was killed outright (SIGKILL, power loss): their pid no longer runs. Those of live exports,
    of other hosts (a shared filesystem) and the "-old-" directory of an interrupted swap (it
    holds the previous model) are left alone."""
    host = socket.gethostname()
    for path in out.parent.glob(f"{TMP_PREFIX}{out.name}-{host}-*"):
        pid_part = path.name[len(f"{TMP_PREFIX}{out.name}-{host}-"):].split("-", 1)[0]
        if not pid_part.isdigit() or not path.is_dir() or path.is_symlink():
            continue
        try:
            os.kill(int(pid_part), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, another user's
            continue


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them to the handlers that were
    in place, so a rename-into-place or a cleanup is never cut in half. (Blocking the signals
    with pthread_sigmask would not do: onnxruntime's and torch's threads would still take them.)
    A no-op off the main thread, where Python runs no signal handlers anyway."""
    signums = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in signums}
    if any(h is None for h in old.values()):  # installed outside Python: cannot restore
        yield
        return
    held: list[int] = []
    for s in signums:
        signal.signal(s, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if held:
            signal.raise_signal(held[0])


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` is moved aside first and removed only after."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; give it the usual permissions
    for path in tmp.iterdir():  # so do some writers (optimum's external data file is 0600)
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~umask)
    old = None
    if out.exists() or out.is_symlink():
        # Checked again at the swap: the export took minutes, the user may have added a file.
        _check_replaceable(out, force=True)
        old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{out.name}-old-", dir=out.parent))
        os.rename(out, old / "previous")
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old / "previous", out)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def estimated_bytes(model: Any, precisions: Sequence[str], genai_variant: str | None = None
                    ) -> int:
    """Rough bytes the export writes: fp32 weights (+ lm_head copy), plus each extra variant,
    plus the genai-facing copy of a fused variant whose weights sit inside its graph."""
    from gpt2_onnx.export.fused import weights_external

    n_params = sum(p.numel() for p in model.parameters())
    lm_head = model.config.vocab_size * model.config.n_embd * 4
    total = sum(n_params * registry.get(p).bytes_per_param for p in precisions) + lm_head
    if genai_variant is not None and registry.get(genai_variant).family == "fused" \
            and not weights_external(model):
        total += n_params * registry.get(genai_variant).bytes_per_param
    return int(total)


def _check_disk(model: Any, where: Path, precisions: Sequence[str],
                genai_variant: str | None = None) -> None:
    need = estimated_bytes(model, precisions, genai_variant)
    free = shutil.disk_usage(where).free
    if free < need * 1.1:
        raise ExportError(
            f"not enough free disk in {where.resolve()}: the export needs about "
            f"{need / 1e9:.2f} GB and {free / 1e9:.2f} GB is free. Free space or pass --out "
            "on a larger disk."
        )


def export_optimum_fp32(model: Any, out_dir: Path) -> Variant:
    """optimum's text-generation-with-past export of `model` into out_dir/model.onnx (+ data)."""
    import warnings

    from optimum.exporters.onnx import onnx_export_from_model

    raw = out_dir / "optimum-raw"
    with warnings.catch_warnings(), _quiet_logger("optimum"):
        warnings.simplefilter("ignore")  # tracer warnings are expected and not actionable
        onnx_export_from_model(model, raw, task="text-generation-with-past",
                               do_validation=False)
    graph = raw / "model.onnx"
    if not graph.is_file():
        raise ExportError(f"optimum produced no model.onnx in {raw}")
    data = external_data_files(graph)
    graph_edit.add_last_logits(graph, VariantIO().logits)
    for name in ["model.onnx", *data]:
        os.replace(raw / name, out_dir / name)
    shutil.rmtree(raw)
    gc.collect()  # the traced graph held gigabytes for gpt2-large; give them back before verify
    return Variant(precision="fp32", graph="model.onnx", data=tuple(data), dtype="float32",
                   io=VariantIO(logits_last=LAST_LOGITS))


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Only errors of logger `name` reach the terminal while the block runs: optimum's warnings
    (e.g. "Weight deduplication check ... requires accelerate": the optional pass that would
    drop the tied lm_head copy, which our graph keeps on purpose) are not the user's business."""
    import logging

    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


def external_data_files(graph: Path) -> list[str]:
    """Names of the external data files `graph` references (refusing paths that leave its dir);
    read as the runtime reads them when it loads the directory (manifest.graph_external_data)."""
    names = set(graph_external_data(graph))
    for name in names:
        if safe_child(graph.parent, name) is None:
            raise ExportError(f"{graph}: external data {name!r} points outside the directory")
    return sorted(names)


def build_extra_variant(model: Any, out_dir: Path, precision: str) -> Variant:
    """Run the registered builder of `precision` (export/builders.py); the Variant carries the
    registry entry's name and verify thresholds."""
    spec = registry.get(precision)
    return _as_entry(builder_for(precision)(model, out_dir, spec), spec)


def _as_entry(variant: Variant, spec: registry.VariantSpec) -> Variant:
    """`variant` named as the registry entry `spec` and carrying its thresholds (the record
    in the manifest; verify applies the registry's own)."""
    return replace(variant, precision=spec.name, thresholds=dict(spec.thresholds))


def model_dims(config: Any) -> ModelDims:
    eos = config.eos_token_id if config.eos_token_id is not None else config.vocab_size - 1
    bos = config.bos_token_id if config.bos_token_id is not None else eos
    return ModelDims(
        n_layer=config.n_layer, n_head=config.n_head, head_dim=config.n_embd // config.n_head,
        n_embd=config.n_embd, n_positions=config.n_positions, vocab_size=config.vocab_size,
        bos_token_id=int(bos), eos_token_id=int(eos),
    )


EXPORT_VERSIONS = ("gpt2-onnx", "torch", "transformers", "optimum", "optimum-onnx", "onnx",
                   "onnxruntime", "tokenizers", "onnxruntime-genai")  # recorded in the manifest


def _directory_entries(model_dir: Path) -> dict[str, FileEntry]:
    """Size and sha256 of every file in the directory but the manifest itself."""
    files = [p.name for p in model_dir.iterdir() if p.is_file() and p.name != MANIFEST_NAME]
    return file_entries(model_dir, files)


def write_genai(model_dir: Path, resolved: ResolvedSource, variants: dict[str, Variant],
                requested: str | None) -> dict[str, str]:
    """genai_config.json (+ a genai-facing graph for a fused variant) for onnxruntime-genai."""
    from gpt2_onnx.export.genai import choose_genai_variant, write_genai_files

    chosen = choose_genai_variant(list(variants), requested)
    dims = model_dims(resolved.model.config)
    return write_genai_files(model_dir, dims, variants[chosen]).to_json()


def build_manifest(name: str, resolved: ResolvedSource, variants: dict[str, Variant],
                   model_dir: Path, genai: dict[str, str] | None = None) -> Manifest:
    return Manifest(
        name=name, source=resolved.record, dims=model_dims(resolved.model.config),
        variants=variants, files=_directory_entries(model_dir),
        versions=package_versions(EXPORT_VERSIONS), genai=genai,
    )


def refresh_file_entries(model_dir: Path, manifest: Manifest) -> Manifest:
    """The manifest with sizes and hashes recomputed (after a file in the directory changed)."""
    return replace(manifest, files=_directory_entries(model_dir))


def add_fp16_variant(model_dir: Path) -> Path:
    """Add the fp16 variant to an existing model directory (fp32 exported) and rewrite its
    manifest; returns the manifest path. For directories exported without `--precision fp16`."""
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    if "fp32" not in manifest.variants:
        raise ValueError(f"{model_dir}: no fp32 variant to convert")
    variant = _as_entry(build_fp16_variant(model_dir, manifest.variants["fp32"]),
                        registry.get("fp16"))
    manifest = replace(manifest, variants={**manifest.variants, "fp16": variant})
    return refresh_file_entries(model_dir, manifest).write(model_dir)
