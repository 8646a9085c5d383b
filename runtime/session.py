"""onnxruntime sessions: session options, providers (from the Device), load-failure causes."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import onnxruntime as ort

from gpt2_onnx.runtime.device import (  # noqa: F401  (re-exported: older imports)
    CUDA_FIX,
    CUDA_PROVIDER,
    Device,
    cuda_device_count,
    resolve_device,
)
from gpt2_onnx.runtime.errors import DeviceError, ModelDirError, SessionLoadError


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


def create_session(graph: Path, device: Device, threads: int | None = None,
                   prepack: bool = True) -> ort.InferenceSession:
    """A session for `graph` on the resolved `device` (its providers and provider options)."""
    opts = session_options(threads, prepack)
    if device.name == "cuda" and hasattr(ort, "preload_dlls"):
        # onnxruntime-gpu >= 1.21: load CUDA/cuDNN from the nvidia-* pip packages (torch's) when
        # they are not on the library path; a failure here shows up as the provider check below.
        with contextlib.suppress(OSError):
            ort.preload_dlls(msvc=False)
    try:
        session = ort.InferenceSession(str(graph), sess_options=opts,
                                       providers=device.providers())
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise load_failure(graph, device, exc) from exc
    if device.name == "cuda" and CUDA_PROVIDER not in session.get_providers():
        raise DeviceError(
            f"--device {device}: onnxruntime-gpu is installed but could not load CUDA (driver "
            f"or CUDA/cuDNN libraries missing); {CUDA_FIX}."
        )
    return session


# Substrings of onnxruntime's messages, by cause (its exceptions carry no finer type).
_OOM = ("bad_alloc", "out of memory", "failed to allocate", "cudaerrormemoryallocation")
_UNSUPPORTED = ("could not find an implementation", "not a registered function/op",
                "unsupported model ir version", "opset", "no opset import for domain",
                "is under development and support for this is limited")


def load_failure(graph: Path, device: Device, exc: BaseException) -> Exception:
    """The error to raise when onnxruntime cannot load `graph`, named by its cause: out of
    memory, an operator or format this onnxruntime lacks, CUDA, or a damaged file."""
    first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or any(k in text for k in _OOM):
        return SessionLoadError(
            f"{graph}: out of memory while loading on {device} ({first}). Free memory, load a "
            "smaller variant (--precision int8 or int4), or use --fast-load (fp32 variants).")
    if device.name == "cuda" and "cuda" in text:
        return DeviceError(f"CUDA session for {graph.name} failed ({first}); {CUDA_FIX}.")
    if any(k in text for k in _UNSUPPORTED):
        return SessionLoadError(
            f"{graph}: onnxruntime {ort.__version__} cannot run this graph ({first}): it needs "
            "an operator or format this onnxruntime lacks. Upgrade onnxruntime "
            "(pip install -U onnxruntime) or re-export with the installed version.")
    return ModelDirError(
        f"{graph}: onnxruntime cannot load this graph ({first}). The file is damaged or not a "
        "gpt2-onnx export; re-export (`gpt2-onnx export --force`).")
