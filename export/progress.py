"""Export progress on stderr with rich: each stage with its elapsed time, then a file summary."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.table import Table


class RichProgress:
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        with self.console.status(f"{name} …"):
            try:
                yield
            except BaseException:
                self.console.print(f"[red]✗[/] {name} ({time.perf_counter() - start:.1f} s)")
                raise
        self.console.print(f"[green]✓[/] {name} ({time.perf_counter() - start:.1f} s)")

    def done(self, out_dir: Path, files: dict[str, int], seconds: float) -> None:
        table = Table(title=f"{out_dir} ({seconds:.1f} s)")
        table.add_column("file")
        table.add_column("size", justify="right")
        for name, size in files.items():
            table.add_row(name, f"{size / 1e6:,.1f} MB")
        table.add_row("total", f"{sum(files.values()) / 1e6:,.1f} MB", style="bold")
        self.console.print(table)
