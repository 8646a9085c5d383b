"""Run the app under uvicorn: listen first, load the model in the background, drain on signals.

Lifecycle:
- The socket is bound before anything loads (a taken port fails at once), the URL is printed,
  and /health answers 503 until the model is loaded (then 200).
- SIGTERM or Ctrl-C (SIGINT): new requests get 503 (and /health 503, so a load balancer stops
  sending); requests in flight finish, for at most `grace` seconds, after which they are
  cancelled; then the server closes and `serve` returns 0. A second signal quits at once.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

from gpt2_onnx.runtime.errors import Gpt2OnnxError
from gpt2_onnx.serve.host import EngineHost, ServeOptions
from gpt2_onnx.serve.routes import ServerState

__all__ = ["ServeOptions", "serve"]  # ServeOptions lives in host.py (shared with ray_app.py)

log = logging.getLogger("gpt2_onnx.serve")
CUT_FLUSH_S = 2.0  # after the grace: time for cancelled requests to send their last bytes
CLOSE_TIMEOUT_S = 5  # uvicorn's wait for connections once the server closes


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains instead of closing at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState, grace: float,
                 say: Callable[[str], None]) -> None:
        super().__init__(config)
        self.state = state
        self.grace = grace
        self.say = say
        self._signalled = 0
        self._deadline: float | None = None
        self._cut_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it after shutdown and the
        # process would die by the signal instead of exiting 0.
        self._signalled += 1
        if self._signalled > 1 or self.state.phase != "ready":
            self.should_exit = True
            if self._signalled > 1:
                self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self._signalled and self._deadline is None and self.state.phase == "ready":
            self.state.phase = "draining"
            self._deadline = time.monotonic() + self.grace
            self.say(f"draining: {self.state.in_flight} request(s) in flight, up to "
                     f"{self.grace:g} s (a second signal quits at once)")
        if self._deadline is not None:
            now = time.monotonic()
            if self.state.in_flight == 0:
                return True
            if now >= self._deadline and self._cut_at is None:
                self._cut_at = now
                n = self.state.cancel_all()
                self.say(f"grace over: cancelled {n} request(s)")
            if self._cut_at is not None and now >= self._cut_at + CUT_FLUSH_S:
                return True
        return await super().on_tick(counter)


def serve(opts: ServeOptions, say: Callable[[str], None] | None = None) -> int:
    """Run the server until a signal drains it. Returns the exit code (0 after a drain, 1 when
    the model failed to load). Raises ValueError / Gpt2OnnxError / OSError before starting."""
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    opts.validate()
    engine_host = EngineHost(opts)  # the manifest read once, the variant checked, nothing loaded
    state = engine_host.state
    sock = _bind(opts.host, opts.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(engine_host.app(), log_level="warning", access_log=False,
                            lifespan="off", timeout_graceful_shutdown=CLOSE_TIMEOUT_S)
    server = _DrainingServer(config, state, opts.grace, say)
    say(f"gpt2-onnx serve: http://{shown}:{port} (model {state.model_id!r}, "
        f"{engine_host.plan.precision}, {opts.slots} slots, max queue {opts.max_queue}"
        f"{', API key required' if opts.api_key else ''}); loading")
    loader = threading.Thread(target=_load, args=(engine_host, server, say),
                              name="gpt2-onnx-load", daemon=True)
    loader.start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        engine_host.close(grace=0)
    if state.phase == "failed":
        say(f"error: the model failed to load: {state.failure}")
        return 1
    say("gpt2-onnx serve: stopped")
    return 0


def _load(engine_host: EngineHost, server: uvicorn.Server, say: Callable[[str], None]) -> None:
    """The loader thread: load and start the engine while the socket already answers 503."""
    state = engine_host.state
    start = time.perf_counter()
    try:
        engine_host.load()
    except (Gpt2OnnxError, ValueError, OSError) as exc:
        state.failure = str(exc)
        state.phase = "failed"
        server.should_exit = True
        return
    if server.should_exit:  # a signal came while loading
        engine_host.close(grace=0)
        return
    engine_host.expose()
    gen = engine_host.generator
    assert gen is not None
    say(f"ready in {time.perf_counter() - start:.1f} s ({gen.device}, {gen.precision})")


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket (IPv4 or IPv6 by the host's form); OSError names the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock

