"""Builders of the extra variants: one function per registry entry (runtime/variants.py).

A builder writes its variant's graph (the entry's file name) into the export's directory, after
optimum's fp32 graph is there, and returns the manifest Variant. The pipeline looks the builder
up here (`builder_for`) and stamps the entry's name and thresholds on what it returns
(pipeline.build_extra_variant). Adding a variant = `variants.register(VariantSpec(...))` +
`register_builder(name, fn)`.

The table is keyed by the registry's variant names and lives on the export side, not in the
torch-free registry: a builder is export code (torch, onnx), and a callable here is checked by
import and by ruff, where a "module:function" string in runtime/variants.py would be resolved
only when an export runs. This module imports nothing heavy at import time (the CLI reads
`exportable()` for its help); each builder imports its graph module when it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpt2_onnx.runtime import variants
from gpt2_onnx.runtime.manifest import Variant
from gpt2_onnx.runtime.variants import VariantSpec

# (transformers model, export directory, the entry) -> the Variant written there
Builder = Callable[[Any, Path, VariantSpec], Variant]

BUILDERS: dict[str, Builder] = {}


def register_builder(name: str, builder: Builder, *, replace_existing: bool = False) -> None:
    """Register the builder of variant `name` (which must be in the variant registry)."""
    variants.get(name)
    if name in BUILDERS and not replace_existing:
        raise ValueError(f"variant {name!r} already has a builder")
    BUILDERS[name] = builder


def builder_for(name: str) -> Builder:
    """The builder of `name`; ValueError when the variant is unknown or has none."""
    variants.get(name)
    if name not in BUILDERS:
        raise ValueError(f"precision {name!r}: no builder registered (exportable: "
                         f"{', '.join(exportable())})")
    return BUILDERS[name]


def exportable() -> tuple[str, ...]:
    """Variants export can write: fp32 (optimum's graph, always written) and every built one."""
    return ("fp32", *(n for n in variants.names() if n in BUILDERS))


def build_fused(model: Any, out_dir: Path, spec: VariantSpec) -> Variant:
    """The fused GroupQueryAttention graph with the entry's weight dtype."""
    from gpt2_onnx.export.fused import build_fused_graph

    weights = {"float32": "fp32", "int8": "int8", "int4": "int4"}.get(spec.weight_dtype)
    if weights is None:
        raise ValueError(f"variant {spec.name!r}: the fused graph has no {spec.weight_dtype} "
                         "weights (float32, int8, int4)")
    return build_fused_graph(model, out_dir, weights, graph_name=spec.graph)


def build_fp16(model: Any, out_dir: Path, spec: VariantSpec) -> Variant:
    """optimum's fp32 graph (already in out_dir) converted to float16."""
    from gpt2_onnx.export.fp16 import build_fp16_variant

    return build_fp16_variant(out_dir)


def build_fp16_fused(model: Any, out_dir: Path, spec: VariantSpec) -> Variant:
    """The fused GroupQueryAttention graph in float16 (the CUDA path)."""
    from gpt2_onnx.export.fused import build_fp16_fused_variant

    return build_fp16_fused_variant(model, out_dir, graph_name=spec.graph)


for _name in ("fp32-fused", "int8", "int4"):
    register_builder(_name, build_fused)
register_builder("fp16", build_fp16)
register_builder("fp16-fused", build_fp16_fused)
