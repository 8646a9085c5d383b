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


class ParameterError(Gpt2OnnxError, ValueError):
    """A setting outside its allowed range, its name carried as data for front ends to map
    (the HTTP server's `error.param`) instead of parsed out of the message.

    param: the first bad setting's name (None when not one setting's fault); problems: a
    (name, message) pair for every bad setting; str(): every message, joined by "; ".
    """

    def __init__(self, message: str, param: str | None = None,
                 problems: tuple[tuple[str | None, str], ...] = ()) -> None:
        super().__init__(message)
        self.param = param
        self.problems = tuple(problems) or ((param, message),)

    @property
    def params(self) -> tuple[str, ...]:
        """The names of every bad setting, in the order they were checked."""
        return tuple(name for name, _ in self.problems if name is not None)


class ContextLengthError(ParameterError):
    """The prompt, or the prompt plus max_new_tokens, does not fit the positions available.

    param is "prompt" (the prompt alone is too long) or "max_new_tokens"; the figures are data
    so a front end words the limit in its own terms (the server: 413, max_tokens).
    """

    def __init__(self, message: str, param: str | None = None,
                 problems: tuple[tuple[str | None, str], ...] = (), *,
                 prompt_tokens: int = 0, max_new_tokens: int = 0, limit: int = 0) -> None:
        super().__init__(message, param, problems)
        self.prompt_tokens = prompt_tokens  # tokens in the prompt
        self.max_new_tokens = max_new_tokens  # tokens asked for
        self.limit = limit  # positions available: n_positions, or an engine's smaller max_len

    @property
    def room(self) -> int:
        """The most new tokens this prompt allows (a prompt of 0 tokens takes one position)."""
        return max(self.limit - max(self.prompt_tokens, 1), 0)
