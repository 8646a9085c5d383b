"""gpt2_onnx.runtime: torch-free GPT-2 generation on onnxruntime.

Imports only onnxruntime (where a graph runs), tokenizers and numpy (typer and rich for the CLI).
"""

from gpt2_onnx.runtime.device import Device
from gpt2_onnx.runtime.engine import (
    DoneEvent,
    Engine,
    EngineClosedError,
    EngineStats,
    GenerationError,
    GenerationParams,
    QueueFullError,
    Request,
    StepGenerator,
    TokenEvent,
)
from gpt2_onnx.runtime.errors import (
    DeviceError,
    Gpt2OnnxError,
    InternalError,
    MissingExtraError,
    ModelDirError,
    SessionLoadError,
)
from gpt2_onnx.runtime.generator import (
    Candidate,
    GenerationResult,
    StepRecord,
    TextGenerator,
    Timings,
)
from gpt2_onnx.runtime.manifest import Manifest, check_files, read_manifest
from gpt2_onnx.runtime.sampling import SamplingSettings
from gpt2_onnx.runtime.scoring import TextScore, perplexity
from gpt2_onnx.runtime.variants import VariantSpec

__all__ = [
    "Candidate",
    "Device",
    "DeviceError",
    "DoneEvent",
    "Engine",
    "EngineClosedError",
    "EngineStats",
    "GenerationError",
    "GenerationParams",
    "GenerationResult",
    "Gpt2OnnxError",
    "InternalError",
    "Manifest",
    "MissingExtraError",
    "ModelDirError",
    "QueueFullError",
    "Request",
    "SamplingSettings",
    "StepGenerator",
    "SessionLoadError",
    "StepRecord",
    "TextScore",
    "TextGenerator",
    "Timings",
    "TokenEvent",
    "VariantSpec",
    "check_files",
    "perplexity",
    "read_manifest",
]
