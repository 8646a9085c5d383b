"""gpt2_onnx.runtime: torch-free GPT-2 generation on onnxruntime.

Imports only onnxruntime (where a graph runs), tokenizers and numpy (typer and rich for the CLI).
The public names below are imported on first use (PEP 562), so `gpt2-onnx` starts by importing
this package alone: Ctrl-C in its first tenth of a second ends cleanly (exit 130) instead of in a
traceback from inside numpy's import.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (startup time)

# public name -> module that defines it
_EXPORTS = {
    "Device": "device",
    "EngineConfig": "config",
    "Engine": "engine",
    "EngineStats": "engine",
    "StepGenerator": "batch",
    "Request": "request",
    "ContextLengthError": "errors",
    "DeviceError": "errors",
    "EngineClosedError": "errors",
    "GenerationError": "errors",
    "Gpt2OnnxError": "errors",
    "InternalError": "errors",
    "MissingExtraError": "errors",
    "ModelDirError": "errors",
    "ParameterError": "errors",
    "QueueFullError": "errors",
    "SessionLoadError": "errors",
    "Candidate": "results",
    "DoneEvent": "results",
    "GenerationResult": "results",
    "StepRecord": "results",
    "Timings": "results",
    "TokenEvent": "results",
    "TextGenerator": "generator",
    "Manifest": "manifest",
    "check_files": "manifest",
    "read_manifest": "manifest",
    "GenerationParams": "params",
    "SamplingSettings": "sampling",
    "TextScore": "scoring",
    "perplexity": "scoring",
    "VariantSpec": "variants",
}

__all__ = [
    "Candidate",
    "ContextLengthError",
    "Device",
    "DeviceError",
    "DoneEvent",
    "Engine",
    "EngineClosedError",
    "EngineConfig",
    "EngineStats",
    "GenerationError",
    "GenerationParams",
    "GenerationResult",
    "Gpt2OnnxError",
    "InternalError",
    "Manifest",
    "MissingExtraError",
    "ModelDirError",
    "ParameterError",
    "QueueFullError",
    "Request",
    "SamplingSettings",
    "SessionLoadError",
    "StepGenerator",
    "StepRecord",
    "TextGenerator",
    "TextScore",
    "Timings",
    "TokenEvent",
    "VariantSpec",
    "check_files",
    "perplexity",
    "read_manifest",
]

if TYPE_CHECKING:
    from gpt2_onnx.runtime.batch import StepGenerator
    from gpt2_onnx.runtime.config import EngineConfig
    from gpt2_onnx.runtime.device import Device
    from gpt2_onnx.runtime.engine import Engine, EngineStats
    from gpt2_onnx.runtime.errors import (
        ContextLengthError,
        DeviceError,
        EngineClosedError,
        GenerationError,
        Gpt2OnnxError,
        InternalError,
        MissingExtraError,
        ModelDirError,
        ParameterError,
        QueueFullError,
        SessionLoadError,
    )
    from gpt2_onnx.runtime.generator import TextGenerator
    from gpt2_onnx.runtime.manifest import Manifest, check_files, read_manifest
    from gpt2_onnx.runtime.params import GenerationParams
    from gpt2_onnx.runtime.request import Request
    from gpt2_onnx.runtime.results import (
        Candidate,
        DoneEvent,
        GenerationResult,
        StepRecord,
        Timings,
        TokenEvent,
    )
    from gpt2_onnx.runtime.sampling import SamplingSettings
    from gpt2_onnx.runtime.scoring import TextScore, perplexity
    from gpt2_onnx.runtime.variants import VariantSpec


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
