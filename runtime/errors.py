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
