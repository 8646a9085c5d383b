"""gpt2_onnx.runtime: torch-free GPT-2 generation on onnxruntime.

Imports only onnxruntime, tokenizers and numpy (typer and rich for the CLI).
"""

from gpt2_onnx.runtime.errors import DeviceError, Gpt2OnnxError, ModelDirError
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

__all__ = [
    "Candidate",
    "DeviceError",
    "GenerationResult",
    "Gpt2OnnxError",
    "Manifest",
    "ModelDirError",
    "SamplingSettings",
    "StepRecord",
    "TextScore",
    "TextGenerator",
    "Timings",
    "check_files",
    "perplexity",
    "read_manifest",
]
