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
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import uvicorn

from gpt2_onnx.runtime.errors import Gpt2OnnxError
from gpt2_onnx.serve.app import create_app
from gpt2_onnx.serve.routes import ServerState

log = logging.getLogger("gpt2_onnx.serve")
CUT_FLUSH_S = 2.0  # after the grace: time for cancelled requests to send their last bytes
CLOSE_TIMEOUT_S = 5  # uvicorn's wait for connections once the server closes


@dataclass(frozen=True)
class ServeOptions:
    """Settings of `gpt2-onnx serve` (see its --help)."""

    model_dir: Path
    host: str = "127.0.0.1"  # 0.0.0.0 (all interfaces) only when asked for
    port: int = 8000  # 0: any free port (the printed URL says which)
    precision: str | None = None  # a shared-KV variant (fp32-fused, int8, int4); default per device
    device: str = "auto"
    threads: int | None = None
    slots: int = 8  # requests decoded together
    max_queue: int = 64  # requests that may wait for a slot; one more gets 429
    prefill_chunk: int = 64  # prompt tokens loaded per step while others decode
    api_key: str | None = None
    grace: float = 30.0  # seconds in-flight requests get to finish after SIGTERM / Ctrl-C
    log_prompts: bool = False
    model_id: str | None = None  # default: the model directory's name

    def validate(self) -> None:
        """ValueError naming every setting outside its range (before anything starts)."""
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"port must be in [0, 65535], got {self.port}")
        for name, value, low in (("slots", self.slots, 1), ("max_queue", self.max_queue, 0),
                                 ("prefill_chunk", self.prefill_chunk, 1)):
            if value < low:
                problems.append(f"{name} must be >= {low}, got {value}")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads must be >= 1, got {self.threads}")
        if not self.grace >= 0:
            problems.append(f"grace must be >= 0 seconds, got {self.grace}")
        if self.api_key is not None and not self.api_key.strip():
            problems.append("api_key must not be empty")
        if self.model_id is not None and not self.model_id.strip():
            problems.append("model name must not be empty")
        if problems:
            raise ValueError("; ".join(problems))


def check_model_dir(opts: ServeOptions) -> str:
    """Read the manifest and pick the variant now (cheap), so a wrong directory or a variant the
    engine cannot batch fails before the server starts. Returns the precision."""
    from gpt2_onnx.runtime import variants
    from gpt2_onnx.runtime.device import resolve_device
    from gpt2_onnx.runtime.generator import pick_variant
    from gpt2_onnx.runtime.manifest import read_manifest

    manifest = read_manifest(opts.model_dir)
    variant = pick_variant(manifest, opts.precision, resolve_device(opts.device))
    if variants.get(variant.precision).kv_layout != "shared":
        present = [p for p in manifest.variants if variants.get(p).kv_layout == "shared"]
        known = [n for n in variants.names() if variants.get(n).kv_layout == "shared"]
        hint = (f"pass --precision {present[0]}" if present else
                f"re-export with a shared-KV variant beside fp32 (--precision fp32,{known[0]}; "
                f"any of {', '.join(known)})")
        raise Gpt2OnnxError(
            f"{opts.model_dir}: variant {variant.precision!r} (a concat-KV graph) cannot batch "
            f"requests in flight; the server needs a shared-KV variant: {hint}")
    return variant.precision


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
    precision = check_model_dir(opts)
    model_id = opts.model_id or Path(opts.model_dir).resolve().name
    sock = _bind(opts.host, opts.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    state = ServerState(model_id=model_id, api_key=opts.api_key, log_prompts=opts.log_prompts)
    app = create_app(state)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=CLOSE_TIMEOUT_S)
    server = _DrainingServer(config, state, opts.grace, say)
    say(f"gpt2-onnx serve: http://{shown}:{port} (model {model_id!r}, {precision}, "
        f"{opts.slots} slots, max queue {opts.max_queue}"
        f"{', API key required' if opts.api_key else ''}); loading")
    loader = threading.Thread(target=_load, args=(opts, precision, state, server, say),
                              name="gpt2-onnx-load", daemon=True)
    loader.start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if state.engine is not None:
            state.engine.close(grace=0)
    if state.phase == "failed":
        say(f"error: the model failed to load: {state.failure}")
        return 1
    say("gpt2-onnx serve: stopped")
    return 0


def _load(opts: ServeOptions, precision: str, state: ServerState, server: uvicorn.Server,
          say: Callable[[str], None]) -> None:
    from gpt2_onnx.runtime.engine import Engine
    from gpt2_onnx.runtime.generator import TextGenerator

    start = time.perf_counter()
    try:
        gen = TextGenerator.load(opts.model_dir, device=opts.device, precision=precision,
                                 threads=opts.threads)
        engine = Engine(gen, slots=opts.slots, max_queue=opts.max_queue,
                        prefill_chunk=opts.prefill_chunk).start()
    except (Gpt2OnnxError, ValueError, OSError) as exc:
        state.failure = str(exc)
        state.phase = "failed"
        server.should_exit = True
        return
    if server.should_exit:  # a signal came while loading
        engine.close(grace=0)
        return
    state.set_ready(engine)
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

