"""Where a model runs: one small type instead of "cpu"/"cuda" strings across the runtime.

A `Device` says which onnxruntime execution provider runs the session (with its options), and
where OrtValues live (the KV cache stays there between steps). `resolve_device("auto" | "cpu" |
"cuda" | "cuda:1")` checks the request against the installed onnxruntime and the driver.
Adding a device is one entry in PROVIDERS plus its check in `resolve_device`.

onnxruntime is imported lazily: the base install (no onnxruntime) still imports this module.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from gpt2_onnx.runtime.errors import DeviceError, MissingExtraError

if TYPE_CHECKING:
    from gpt2_onnx.runtime.manifest import Variant

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
# Device name -> its onnxruntime execution provider.
PROVIDERS = {"cpu": CPU_PROVIDER, "cuda": CUDA_PROVIDER}
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")  # what users may write (help text)
# Provider options every session of a device gets unless its Device overrides them.
# CUDA: TF32 off. onnxruntime's CUDA provider turns it on by default (`use_tf32`), rounding fp32
# matmul inputs to 10-bit mantissas; PyTorch keeps TF32 off for fp32 matmuls. With it on, fp32
# variants miss verify's fp32 limit and fp32 speed figures against PyTorch compare different
# arithmetic. `Device("cuda").with_options(use_tf32="1")` (TextGenerator.load(tf32=True)) opts in.
DEFAULT_OPTIONS: dict[str, dict[str, str]] = {"cuda": {"use_tf32": "0"}}
CUDA_FIX = (
    "install the GPU runtime (pip uninstall onnxruntime; pip install 'gpt2-onnx[gpu]') on a "
    "machine with an NVIDIA driver and CUDA 12/13 libraries, or use --device cpu"
)
_SPEC = re.compile(r"(auto|cpu|cuda)(?::(\d+))?")


@dataclass(frozen=True)
class Device:
    """A resolved device: "cpu", or "cuda" with a device id."""

    name: str  # "cpu" or "cuda": a key of PROVIDERS
    id: int = 0  # which GPU (CUDA device ordinal); 0 on CPU
    # Options of its execution provider beyond device_id (e.g. CUDA's "use_tf32": "0"); strings,
    # as onnxruntime takes them. Set with `with_options`.
    provider_options: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.name not in PROVIDERS:
            raise ValueError(f"device {self.name!r}: choose one of {', '.join(PROVIDERS)}")
        if self.id < 0 or (self.name == "cpu" and self.id != 0):
            raise ValueError(f"device {self.name}:{self.id}: no such device id")

    def __str__(self) -> str:
        return self.name if self.name == "cpu" or self.id == 0 else f"{self.name}:{self.id}"

    @property
    def provider(self) -> str:
        return PROVIDERS[self.name]

    @property
    def ort_device(self) -> str:
        """Where OrtValues of this device live, as onnxruntime names it ("cpu", "cuda")."""
        return self.name

    def providers(self) -> list[Any]:
        """The `providers` argument of onnxruntime.InferenceSession (CPU as the fallback);
        DEFAULT_OPTIONS of the device first, then this Device's own."""
        if self.name == "cpu":
            return [CPU_PROVIDER]
        options = {"device_id": str(self.id), **DEFAULT_OPTIONS.get(self.name, {}),
                   **self.provider_options}
        return [(self.provider, options), CPU_PROVIDER]

    def with_options(self, **options: str) -> Device:
        """The same device with more provider options."""
        return replace(self, provider_options={**self.provider_options, **options})


CPU = Device("cpu")


def parse_device(spec: str) -> tuple[str, int | None]:
    """("auto" | "cpu" | "cuda", id or None) from "auto", "cpu", "cuda", "cuda:1";
    ValueError naming the choices otherwise."""
    match = _SPEC.fullmatch(spec.strip().lower()) if isinstance(spec, str) else None
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise ValueError(f"device {spec!r}: choose one of {', '.join(DEVICE_CHOICES)}")
    return match.group(1), None if match.group(2) is None else int(match.group(2))


def import_onnxruntime() -> Any:
    """onnxruntime, or MissingExtraError naming the extra to install."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingExtraError(
            "onnxruntime is not installed: generation needs it. Install "
            "'gpt2-onnx[cpu]' (or 'gpt2-onnx[gpu]' for CUDA).") from exc
    return onnxruntime


def cuda_device_count() -> int:
    """GPUs the NVIDIA driver reports (0 without a driver), via libcuda itself: the CUDA
    provider is listed by onnxruntime-gpu whether or not the machine has a GPU."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1" if os.name != "nt" else "nvcuda.dll")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def resolve_device(device: str | Device) -> Device:
    """'auto' -> CUDA device 0 when onnxruntime has the CUDA provider and the driver sees a GPU,
    else CPU. DeviceError when CUDA (or a GPU id the driver does not have) is asked for and
    cannot be used. A Device passes through unchanged."""
    if isinstance(device, Device):
        return device
    name, index = parse_device(device)
    if name == "cpu":
        return CPU
    ort = import_onnxruntime()
    has_provider = CUDA_PROVIDER in ort.get_available_providers()
    if name == "auto":
        return Device("cuda") if has_provider and cuda_device_count() > 0 else CPU
    flag = f"--device {device}"
    if not has_provider:
        raise DeviceError(
            f"{flag}: the installed onnxruntime {ort.__version__} has no CUDA provider "
            f"(package onnxruntime-gpu missing); {CUDA_FIX}.")
    count = cuda_device_count()
    if count == 0:
        raise DeviceError(
            f"{flag}: onnxruntime-gpu is installed but no NVIDIA driver or GPU was found "
            f"(libcuda.so.1 missing or it reports 0 devices); {CUDA_FIX}.")
    index = index or 0
    if index >= count:
        raise DeviceError(f"{flag}: the driver reports {count} GPU(s), ids 0..{count - 1}.")
    return Device("cuda", index)


def check_variant_on_device(variant: Variant, device: Device) -> None:
    """ValueError for a fused (GroupQueryAttention) variant that is not float16 on CUDA: the
    CUDA kernel of GroupQueryAttention is fp16/bf16 only, so onnxruntime would run those nodes
    on the CPU and copy the KV buffers across every step, or fail. The KV layout is the
    manifest's (Variant.shared_kv, dtype), so directories exported before the registry are
    checked too."""
    if device.name == "cuda" and variant.shared_kv and variant.dtype != "float16":
        raise ValueError(
            f"precision {variant.precision!r} cannot run on CUDA (its GroupQueryAttention has "
            "no fp32 CUDA kernel); use precision 'fp16-fused' (export it with --precision "
            "fp32,fp16-fused), or 'fp16' / 'fp32'")
