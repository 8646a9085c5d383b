"""The `export` and `verify` commands of `gpt2-onnx`.

gpt2_onnx.cli.main registers them (`register(app)`) only when the export extra is importable;
with the runtime alone it lists stand-ins that print the install hint. This module imports nothing
heavy at import time: the pipeline and verify (torch, transformers, optimum) load when a command
runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from gpt2_onnx.cli.common import (
    EXPORT_FIX,
    EXPORT_PACKAGES,
    call,
    err,
    fail,
    signals_as_interrupt,
    state,
)
from gpt2_onnx.export.builders import exportable
from gpt2_onnx.runtime import variants
from gpt2_onnx.runtime.device import DEVICE_CHOICES


def _run_export_step(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`call` for export/verify: a package of the export extra failing to import inside the
    pipeline (lazy imports) becomes the install hint, not a traceback."""
    try:
        return call(fn, *args, **kwargs)
    except ImportError as exc:
        if state["debug"] or (exc.name or "").split(".")[0] not in EXPORT_PACKAGES:
            raise
        fail(f"{EXPORT_FIX} ({exc.name} cannot be imported: {exc})")


def export(
    source: Annotated[str, typer.Argument(help="Hub id or local checkpoint directory.")]
    = "gpt2-large",
    out: Annotated[Path | None, typer.Option(help="Output directory [models/<name>].")] = None,
    random_init: Annotated[str | None, typer.Option(
        "--random-init", help="Seeded random weights of a preset (tiny, distilgpt2, gpt2, "
        "gpt2-medium, gpt2-large, gpt2-xl) with the real tokenizer.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for --random-init.")] = 0,
    precision: Annotated[str | None, typer.Option(
        help=f"Comma-separated variants: fp32 (always) plus any of "
        f"{', '.join(exportable()[1:])} (default: fp32,fp32-fused).")] = None,
    force: Annotated[bool, typer.Option(
        help="Replace an existing model directory (refused if it holds files no export wrote).")
    ] = False,
    verify: Annotated[bool, typer.Option(help="Verify against transformers at the end.")] = True,
    genai_variant: Annotated[str | None, typer.Option(
        help="Variant genai_config.json points at (onnxruntime-genai) [the first exported of "
        f"{', '.join(variants.genai_preferred())}].")] = None,
) -> None:
    """Convert a GPT-2 checkpoint into a model directory (ONNX + KV cache, tokenizer, manifest)."""
    from gpt2_onnx.export import pipeline, progress

    precisions = (pipeline.DEFAULT_PRECISIONS if precision is None else
                  tuple(p.strip() for p in precision.split(",") if p.strip()))
    if precisions and "fp32" not in precisions:  # "fp32 (always)": `--precision int4` adds it
        precisions = ("fp32", *precisions)
    opts = pipeline.ExportOptions(
        source=source, out=out, random_init=random_init, seed=seed, force=force,
        precisions=precisions, verify=verify, genai_variant=genai_variant)
    with signals_as_interrupt():
        _run_export_step(pipeline.run_export, opts, progress.RichProgress(err))


def verify_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Model directory to check.")],
    reference: Annotated[str | None, typer.Option(
        help="Reference checkpoint (hub id or directory) instead of the manifest's source.")]
    = None,
    prompts: Annotated[Path | None, typer.Option(help="File with one prompt per line.")] = None,
    steps: Annotated[int, typer.Option(help="Decode steps per check.")] = 32,
    precision: Annotated[list[str] | None, typer.Option(
        help=f"Variant(s) to check [all]: {', '.join(variants.names())}.")] = None,
    device: Annotated[str, typer.Option(help=f"{', '.join(DEVICE_CHOICES[1:])}.")] = "cpu",
    report: Annotated[Path | None, typer.Option(help="Write the JSON report here.")] = None,
    genai: Annotated[bool, typer.Option(
        help="Also run onnxruntime-genai on the directory when it is installed.")] = True,
) -> None:
    """Check the runtime's loop against the PyTorch transformers reference."""
    from gpt2_onnx.export import verify as verify_mod

    result = _run_export_step(
        verify_mod.verify_command, model_dir, reference=reference, prompts=prompts, steps=steps,
        precisions=precision, device=device, report_path=report, console=err, genai=genai)
    if not result.passed:
        fail(f"verify failed: {', '.join(result.failed_checks())}")


def register(app: typer.Typer) -> None:
    """Add `export` and `verify` to the `gpt2-onnx` app."""
    app.command("export")(export)
    app.command("verify")(verify_cmd)
