"""What every `gpt2-onnx` command shares: the typer app, the one-line error report, the
library-call guard, SIGTERM as an interrupt and a stdout whose failures are one line.

The CLI is the package's top layer (runtime < export < serve < cli): it imports the others,
nothing imports it. Generated text goes to stdout; progress, timings and tables to stderr.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from gpt2_onnx.runtime import variants
from gpt2_onnx.runtime.errors import Gpt2OnnxError, InternalError

app = typer.Typer(
    add_completion=False, no_args_is_help=True,
    help="Export GPT-2 to ONNX once; generate anywhere with a torch-free runtime.\n\n"
         "Extras: pip install 'gpt2-onnx\\[cpu]' (or \\[gpu]) adds onnxruntime for generate, "
         "score and bench; 'gpt2-onnx\\[export]' adds torch for export and verify; "
         "'gpt2-onnx\\[serve]' adds the HTTP server (serve).")
err = Console(stderr=True, highlight=False)
EXPORT_FIX = (
    "the export extra is not installed: pip install torch==2.13.0 && "
    "pip install 'gpt2-onnx[export]'"
)
# Top-level packages the export extra brings (the export half imports them inside functions).
EXPORT_PACKAGES = ("torch", "transformers", "optimum", "onnx")
state = {"debug": False, "terminated": False}
DEVICE_HELP = "auto, cpu, cuda or cuda:N (a GPU by id)."
PRECISION_HELP = (f"Variant to run: one of the directory's ({', '.join(variants.names())}); "
                  "default: the device's preferred one present.")


@app.callback()
def _main(debug: Annotated[bool, typer.Option(help="Show tracebacks on errors.")] = False) -> None:
    state["debug"] = debug


def fail(message: str, code: int = 1) -> None:
    # Escaped: messages hold brackets ("gpt2-onnx[export]", "[0, 50256]") that are not markup.
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)




def _our_dirs() -> tuple[str, ...]:
    """Directories of gpt2-onnx's own code: the CLI's, the runtime's, and the export's and the
    server's once imported (never imported here just to ask)."""
    dirs = [Path(__file__).resolve().parent]
    for name in ("gpt2_onnx.runtime", "gpt2_onnx.export", "gpt2_onnx.serve"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            dirs.append(Path(module.__file__).resolve().parent)
    return tuple(f"{d}{os.sep}" for d in dirs)


def is_user_error(exc: BaseException) -> bool:
    """True for errors about the user's input or environment (one line, their fix), False for
    internal failures (a bug: InternalError, or a ValueError that numpy, onnxruntime or other
    code raised rather than our own validation, or any other exception)."""
    if isinstance(exc, InternalError):
        return False
    if isinstance(exc, (Gpt2OnnxError, FileNotFoundError)):
        return True
    if isinstance(exc, ValueError):  # ours only if our own code raised it (the innermost frame)
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        return tb is not None and tb.tb_frame.f_code.co_filename.startswith(_our_dirs())
    return False


def report(exc: Exception) -> None:
    """One line for `exc`: the message of a user error, or an internal-error notice."""
    if is_user_error(exc):
        fail(str(exc))
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    fail(f"internal error: {type(exc).__name__}: {first} -- this is a bug in gpt2-onnx, please "
         "report it; --debug shows the traceback", code=2)


def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call library code; its errors become one line and a non-zero exit (see `report`)."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # classified by cause in `report`; --debug re-raises
        if state["debug"]:
            raise
        report(exc)


def missing_export_packages() -> list[str]:
    """Top-level packages of the export extra that cannot be imported."""
    from gpt2_onnx.runtime.errors import missing_packages

    return missing_packages(EXPORT_PACKAGES)


# --------------------------------------------------------------------------- signals and stdout


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the same cleanup runs (partial output flushed, temporary
    files removed); the process then exits 143 instead of 130."""


def raise_terminated(signum: int, frame: object) -> None:
    state["terminated"] = True
    raise Terminated


def interrupt_code(exc: BaseException) -> int:
    return 143 if isinstance(exc, Terminated) or state["terminated"] else 130


class signals_as_interrupt:
    """SIGTERM raises Terminated (a KeyboardInterrupt) while active, so cleanup runs as on
    Ctrl-C. main() installs the same handler for the whole run."""

    def __enter__(self) -> None:
        self._old = signal.signal(signal.SIGTERM, raise_terminated)

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._old)


class StdoutError(Gpt2OnnxError):
    """stdout cannot be written (closed, a full disk, a reader that went away)."""


class GuardedStdout:
    """sys.stdout for the CLI's run: a failed write or flush becomes one StdoutError, and fd 1
    is pointed at /dev/null so Python's own flush at exit does not fail a second time."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def _broken(self, reason: str) -> StdoutError:
        with_devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(with_devnull, 1)
        finally:
            os.close(with_devnull)
        self._stream = None
        return StdoutError(f"cannot write to stdout ({reason}); the output is lost. Redirect "
                           "it to a writable file or a pipe.")

    def write(self, text: str) -> int:
        if self._stream is None:
            raise self._broken("it is closed")
        try:
            return self._stream.write(text)
        except OSError as exc:
            raise self._broken(exc.strerror or str(exc)) from None

    def flush(self) -> None:
        if self._stream is None:
            return
        try:
            self._stream.flush()
        except OSError as exc:
            raise self._broken(exc.strerror or str(exc)) from None

    def isatty(self) -> bool:
        return self._stream is not None and self._stream.isatty()

    def __getattr__(self, name: str) -> Any:
        if self._stream is None:
            raise AttributeError(name)
        return getattr(self._stream, name)
