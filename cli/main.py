"""The `gpt2-onnx` entry point: registers every command on one app and runs it.

Signals during start-up end the process at once (nothing to clean up yet); afterwards Ctrl-C
exits 130 and SIGTERM 143, with partial output flushed. `export` and `verify` are registered only
when the export extra is importable; without it they are listed with the one-line install hint.
`serve` is always listed and, without the serve extra, answers with its hint.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any


def _exit_while_starting(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM while the CLI's modules import: nothing to clean up, so end at once
    with the shell's code (130 / 143) instead of a traceback from inside some import."""
    os.write(2, b"interrupted\n")
    os._exit(128 + signum)


def _on_startup_signals() -> dict[int, Any]:
    try:
        return {s: signal.signal(s, _exit_while_starting) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # imported outside the main thread: signals are not ours to handle
        return {}


_STARTUP_HANDLERS = _on_startup_signals()

import typer  # noqa: E402  (after the handlers: these imports take most of the startup)
from rich.markup import escape  # noqa: E402

import gpt2_onnx.cli.runtime  # noqa: E402,F401  (registers the runtime's commands on `app`)
from gpt2_onnx.cli.common import (  # noqa: E402
    EXPORT_FIX,
    GuardedStdout,
    StdoutError,
    app,
    err,
    fail,
    interrupt_code,
    missing_export_packages,
    raise_terminated,
    report,
    state,
)


def _register_export_commands() -> None:
    """The export package's commands when its extra is importable, else stand-ins that say
    what to install (listed in --help all the same)."""
    missing = missing_export_packages()
    if not missing:
        try:
            from gpt2_onnx.cli.export import register
        except ImportError as exc:
            missing = [exc.name or str(exc)]
        else:
            register(app)
            return
    hint = f"{EXPORT_FIX} ({', '.join(missing)} missing)"
    stand_in = {"context_settings": {"allow_extra_args": True, "ignore_unknown_options": True,
                                     "help_option_names": []},
                "add_help_option": False}

    def unavailable(ctx: typer.Context) -> None:
        fail(hint)

    app.command("export", help="Convert a GPT-2 checkpoint (needs the export extra: "
                "pip install 'gpt2-onnx\\[export]').", **stand_in)(unavailable)
    app.command("verify", help="Check against transformers (needs the export extra: "
                "pip install 'gpt2-onnx\\[export]').", **stand_in)(unavailable)


def _register_serve_command() -> None:
    """`serve` (gpt2_onnx.cli.serve imports the server only when the command runs)."""
    from gpt2_onnx.cli.serve import register

    register(app)


_register_export_commands()
_register_serve_command()

for _signum, _handler in _STARTUP_HANDLERS.items():  # imports done: back to Python's handlers
    signal.signal(_signum, _handler)


def main() -> None:
    """The `gpt2-onnx` entry point: Ctrl-C exits 130, SIGTERM 143 (partial output flushed),
    an unwritable stdout one line and exit 1 — never a traceback."""
    sys.stdout = GuardedStdout(sys.stdout)  # type: ignore[assignment]
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        try:
            app()
        finally:
            sys.stdout.flush()
    except StdoutError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt as exc:
        err.print("[yellow]interrupted[/]")
        sys.exit(interrupt_code(exc))
    except SystemExit as exc:
        # typer turns an interrupt inside a command into exit 130; SIGTERM's is 143.
        if exc.code == 130 and state["terminated"]:
            sys.exit(143)
        raise
    except Exception as exc:  # raised outside `call` (e.g. while streaming): same one line
        if state["debug"]:
            raise
        try:
            report(exc)
        except typer.Exit as done:
            sys.exit(done.exit_code)
