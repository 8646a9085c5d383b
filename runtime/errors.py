"""Errors the runtime raises. Library code raises these; the CLI turns them into one line."""


class Gpt2OnnxError(Exception):
    """Base class for errors that carry a message meant for the user, fix included."""


class ModelDirError(Gpt2OnnxError):
    """A model directory is missing, damaged, or not one this runtime understands."""


class DeviceError(Gpt2OnnxError):
    """The requested device cannot be used (e.g. CUDA asked for without onnxruntime-gpu)."""


class MissingExtraError(Gpt2OnnxError):
    """An optional dependency is not installed; the message names the extra that adds it."""


class InternalError(Gpt2OnnxError):
    """An invariant of the library itself failed: a bug to report, not a user mistake."""


class DecoderInputError(InternalError, ValueError):
    """A decoder was called with inputs its invariants reject (shapes, masks, cache lengths).
    The generation loop builds those inputs, so through the loop or the CLI this is a bug; code
    driving a decoder directly may catch it as the ValueError it also is."""


class SessionLoadError(Gpt2OnnxError):
    """onnxruntime cannot load a sound graph here: out of memory, or an operator it lacks."""


class QueueFullError(Gpt2OnnxError):
    """The engine's waiting queue is full (a server answers 429: retry later)."""


class EngineClosedError(Gpt2OnnxError):
    """The engine is closing or closed and accepts no new requests."""


class GenerationError(Gpt2OnnxError):
    """A request ended with finish_reason "error" (the message says why)."""


def missing_packages(names: tuple[str, ...]) -> list[str]:
    """Those of the top-level packages `names` that cannot be imported, checked without importing
    them (an extra's heavy packages are imported lazily, where they are used)."""
    import importlib.util

    missing = []
    for name in names:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):  # a broken or blocked package counts as missing
            missing.append(name)
    return missing
