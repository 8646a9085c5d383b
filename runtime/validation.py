"""Checks for every user setting, one rule each, used by the generator, scoring, sampling and the
CLI-facing API alike.

Integers: Python ints and numpy integers (np.int64, ...) are accepted and returned as int; bools
(True, np.bool_) are refused everywhere, since `True` silently meaning 1 hides a mistake.
Floats: any finite real (int, float, np.float32, ...), never a bool, nan or inf.
Each check raises a ParameterError (a ValueError) that names the setting and its allowed range,
the name also as data (`.param`); `check_all` runs several and raises one error listing all.
"""

from __future__ import annotations

import errno
import math
import numbers
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gpt2_onnx.runtime.errors import ParameterError

# --threads above this is refused (onnxruntime itself fails on values past int32).
THREADS_PER_CPU_MAX = 16


def is_int(value: object) -> bool:
    """An integer that is not a bool: int or a numpy integer."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_real(value: object) -> bool:
    """A finite real number that is not a bool (int, float or a numpy number; no nan or inf)."""
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float is finite but unusable as one
        return False


def _range(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    left = "(" if lo_open or lo is None else "["
    right = ")" if hi_open or hi is None else "]"
    return f"{left}{'-inf' if lo is None else _num(lo)}, {'inf' if hi is None else _num(hi)}{right}"


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def check_int(name: str, value: object, lo: int | None = None, hi: int | None = None,
              *, hint: str = "") -> int:
    """`value` as an int in [lo, hi] (None: unbounded); ValueError naming `name` otherwise."""
    if not is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ParameterError(f"{name} must be an integer in {_range(lo, hi, False, False)}"
                             f"{hint}, got {show_value(value)}", name)
    return int(value)  # type: ignore[call-overload]


def check_optional_int(name: str, value: object, lo: int | None = None,
                       hi: int | None = None, *, hint: str = "") -> int | None:
    """`check_int`, with None passed through."""
    return None if value is None else check_int(name, value, lo, hi, hint=hint)


def check_float(name: str, value: object, lo: float | None = None, hi: float | None = None,
                *, lo_open: bool = False, hi_open: bool = False, hint: str = "") -> float:
    """`value` as a finite float within the bounds (open or closed); ValueError otherwise."""
    ok = is_real(value)
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = ((lo is None or (v > lo if lo_open else v >= lo))
              and (hi is None or (v < hi if hi_open else v <= hi)))
    if not ok:
        raise ParameterError(f"{name} must be a finite number in "
                             f"{_range(lo, hi, lo_open, hi_open)}{hint}, got {show_value(value)}",
                             name)
    return float(value)  # type: ignore[arg-type]


def check_bool(name: str, value: object) -> bool:
    """True or False (numpy bools included); ValueError for anything else (1, "yes", None)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ParameterError(f"{name} must be True or False, got {show_value(value)}", name)
    return bool(value)


def check_token_ids(name: str, ids: object, vocab_size: int) -> list[int]:
    """A list/tuple/1-D array of integer token ids in [0, vocab_size - 1] (no bools), as ints."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D list of token ids, got shape {ids.shape}")
        ids = ids.tolist() if np.issubdtype(ids.dtype, np.integer) else list(ids)
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"{name}: expected a list of token ids, got {type(ids).__name__}")
    bad = [i for i in ids if not is_int(i) or not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"{name}: token ids must be integers in [0, {vocab_size - 1}]; "
                         f"got {[show_value(b) for b in bad[:5]]}")
    return [int(i) for i in ids]


def check_threads(threads: object) -> int | None:
    """None (the physical cores) or an integer in [1, THREADS_PER_CPU_MAX x logical CPUs]; the
    message says what this machine has."""
    cpus = os.cpu_count() or 1
    return check_optional_int(
        "threads", threads, 1, THREADS_PER_CPU_MAX * max(cpus, 4),
        hint=f" (this machine has {cpus} logical CPUs; more threads than cores slow decoding)")


def check_output_file(name: str, path: str | os.PathLike[str]) -> Path:
    """A path a file can be written to: not a directory, in an existing writable directory.
    Checked before long work so it does not fail at the end."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise ValueError(f"{name} {p}: is a directory; give a file path, e.g. {p / 'report.json'}")
    if not parent.is_dir():
        raise ValueError(f"{name} {p}: the directory {parent} does not exist")
    if p.exists() and not os.access(p, os.W_OK) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {p}: not writable ({os.strerror(errno.EACCES)})")
    return p


def check_all(*checks: Callable[[], Any], prefix: str = "") -> None:
    """Run every check; when any raised ValueError, raise one ParameterError whose message is
    `prefix` + their messages joined by "; " and whose `problems` list every bad setting (those
    of a nested ParameterError included), `param` the first."""
    errors: list[ValueError] = []
    for check in checks:
        try:
            check()
        except ValueError as exc:
            errors.append(exc)
    if not errors:
        return
    problems: list[tuple[str | None, str]] = []
    for exc in errors:
        if isinstance(exc, ParameterError):
            problems.extend(exc.problems)
        else:
            problems.append((None, str(exc)))
    first = next((name for name, _ in problems if name is not None), None)
    raise ParameterError(prefix + "; ".join(str(e) for e in errors), first, tuple(problems))


def show_value(value: object) -> str:
    """repr of a value for a message, cut short (a huge list or string stays readable)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
