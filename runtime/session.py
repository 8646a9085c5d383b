"""onnxruntime sessions: device resolution, providers and session options."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import onnxruntime as ort

from gpt2_onnx.runtime.errors import DeviceError, ModelDirError

DEVICES = ("auto", "cpu", "cuda")
CUDA_PROVIDER = "CUDAExecutionProvider"
CUDA_FIX = (
    "install the GPU runtime (pip uninstall onnxruntime; pip install 'gpt2-onnx[gpu]') on a "
    "machine with an NVIDIA driver and CUDA 12/13 libraries, or use --device cpu"
)


def physical_cores() -> int:
    """Physical cores available to this process (onnxruntime's best thread count for decode)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores: set[tuple[str, str]] = set()
    try:
        for cpu in allowed:
            topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
            cores.add(((topo / "physical_package_id").read_text().strip(),
                       (topo / "core_id").read_text().strip()))
    except OSError:
        return len(allowed)
    return max(1, len(cores))


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


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when onnxruntime has the CUDA provider and the driver sees a GPU, else
    'cpu'. DeviceError when 'cuda' is asked for and either is missing."""
    if device not in DEVICES:
        raise ValueError(f"device {device!r}: choose one of {', '.join(DEVICES)}")
    has_provider = CUDA_PROVIDER in ort.get_available_providers()
    if device == "auto":
        return "cuda" if has_provider and cuda_device_count() > 0 else "cpu"
    if device == "cuda" and not has_provider:
        raise DeviceError(
            f"--device cuda: the installed onnxruntime {ort.__version__} has no CUDA provider "
            f"(package onnxruntime-gpu missing); {CUDA_FIX}."
        )
    if device == "cuda" and cuda_device_count() == 0:
        raise DeviceError(
            "--device cuda: onnxruntime-gpu is installed but no NVIDIA driver or GPU was found "
            f"(libcuda.so.1 missing or it reports 0 devices); {CUDA_FIX}."
        )
    return device


def session_options(threads: int | None, prepack: bool = True) -> ort.SessionOptions:
    """prepack=False skips onnxruntime's weight prepacking: the weights stay memory-mapped from
    the data file, so loading is ~10x faster and RSS stays at the weights' size, at a few percent
    of decode speed for fp32 graphs (quantized MatMulNBits graphs need prepacking)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or physical_cores()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # warnings from the optimizer are not the user's business
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return opts


def cuda_provider_options(device_id: int = 0, tf32: bool = False) -> dict[str, str]:
    """Options of onnxruntime's CUDA provider.

    TF32 is off unless asked for: the CUDA provider turns it on by default (`use_tf32`), which
    rounds fp32 matmul inputs to 10-bit mantissas. PyTorch keeps TF32 off for fp32 matmuls, so
    with it on an fp32 variant misses verify's fp32 limit by far, and fp32 speed figures against
    PyTorch compare different arithmetic. fp16 variants are unaffected either way.
    """
    return {"device_id": str(device_id), "use_tf32": "1" if tf32 else "0"}


def create_session(graph: Path, device: str, threads: int | None = None,
                   device_id: int = 0, prepack: bool = True,
                   tf32: bool = False) -> ort.InferenceSession:
    """A session for `graph` on the resolved device ('cpu' or 'cuda'); `tf32` allows TF32
    matmuls on CUDA (off by default: see cuda_provider_options)."""
    opts = session_options(threads, prepack)
    if device == "cuda" and hasattr(ort, "preload_dlls"):
        # onnxruntime-gpu >= 1.21: load CUDA/cuDNN from the nvidia-* pip packages (torch's) when
        # they are not on the library path; a failure here shows up as the provider check below.
        with contextlib.suppress(OSError):
            ort.preload_dlls(msvc=False)
    if device == "cuda":
        providers: list = [(CUDA_PROVIDER, cuda_provider_options(device_id, tf32)),
                           "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(graph), sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        if device == "cuda" and "CUDA" in str(exc):
            raise DeviceError(f"CUDA session for {graph.name} failed ({exc}); {CUDA_FIX}.") \
                from exc
        raise ModelDirError(
            f"{graph}: onnxruntime cannot load this graph ({str(exc).splitlines()[0][:300]}). "
            "The file is damaged or not a gpt2-onnx export; re-export (`gpt2-onnx export --force`)."
        ) from exc
    if device == "cuda" and CUDA_PROVIDER not in session.get_providers():
        raise DeviceError(
            "--device cuda: onnxruntime-gpu is installed but could not load CUDA (driver or "
            f"CUDA/cuDNN libraries missing); {CUDA_FIX}."
        )
    return session
