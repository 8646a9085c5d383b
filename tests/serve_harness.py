"""`gpt2-onnx serve` as a real subprocess, for the tests of what is built on the server."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

LAUNCH = "import sys; from gpt2_onnx.cli import main; sys.argv[0] = 'gpt2-onnx'; main()"


@contextlib.contextmanager
def running_server(model_dir: Path, *args: str, timeout: float = 120) -> Iterator[str]:
    """Start `gpt2-onnx serve MODEL_DIR --port 0 --threads 1 --slots 2 ARGS` (the URL is read
    from its first line), yield the base URL once /health answers 200, then SIGTERM it and
    check that it exited 0."""
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "serve", str(model_dir),
                                 "--port", "0", "--threads", "1", "--slots", "2", *args],
                                stdout=subprocess.DEVNULL, stderr=log,
                                env={**os.environ, "COLUMNS": "300", "NO_COLOR": "1"})
        said = lambda: Path(log.name).read_text()  # noqa: E731
        try:
            deadline = time.monotonic() + timeout
            url = None
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}: {said()}")
                if url is None:
                    found = re.search(r"http://127\.0\.0\.1:\d+", said())
                    url = found.group(0) if found else None
                if url is not None:
                    with contextlib.suppress(httpx.TransportError):
                        if httpx.get(url + "/health", timeout=2).status_code == 200:
                            break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server not ready in {timeout} s: {said()}")
                time.sleep(0.1)
            yield url
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise
        assert code == 0, f"server exited with {code}: {said()}"
