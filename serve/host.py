"""Hosting an engine for the ASGI app: the one way `gpt2-onnx serve` and a Ray replica load the
model, start its engine, hand it to the routes and close it.

    host = EngineHost(opts)          # reads the manifest once and picks a shared-KV variant
    app = host.app()                 # the FastAPI app over host.state (503 until loaded)
    host.load()                      # TextGenerator.load + Engine(...).start(); state ready
    ...
    host.close(grace=0)              # on shutdown

Imports no server (uvicorn) and no Ray: server.py and ray_app.py build on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gpt2_onnx.runtime import variants
from gpt2_onnx.runtime.config import DEFAULTS, EngineConfig
from gpt2_onnx.runtime.errors import Gpt2OnnxError
from gpt2_onnx.serve.routes import ServerState

if TYPE_CHECKING:
    from fastapi import FastAPI

    from gpt2_onnx.runtime.engine import Engine
    from gpt2_onnx.runtime.generator import TextGenerator
    from gpt2_onnx.runtime.manifest import Manifest


@dataclass(frozen=True)
class ServeOptions:
    """Settings of `gpt2-onnx serve` (see its --help)."""

    model_dir: Path
    host: str = "127.0.0.1"  # 0.0.0.0 (all interfaces) only when asked for
    port: int = 8000  # 0: any free port (the printed URL says which)
    precision: str | None = None  # a shared-KV variant (fp32-fused, int8, int4); default per device
    device: str = "auto"
    threads: int | None = None
    slots: int = DEFAULTS.slots  # requests decoded together
    max_queue: int = DEFAULTS.max_queue  # requests that may wait for a slot; one more gets 429
    prefill_chunk: int = DEFAULTS.prefill_chunk  # prompt tokens per step while others decode
    api_key: str | None = None
    grace: float = 30.0  # seconds in-flight requests get to finish after SIGTERM / Ctrl-C
    log_prompts: bool = False
    model_id: str | None = None  # default: the model directory's name
    ui: bool = True  # the playground page at GET / (--no-ui: off)

    def engine_config(self) -> EngineConfig:
        """The engine's settings (the rest at EngineConfig's defaults)."""
        return EngineConfig(slots=self.slots, max_queue=self.max_queue,
                            prefill_chunk=self.prefill_chunk)

    def validate(self) -> None:
        """ValueError naming every setting outside its range (before anything starts)."""
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"port must be in [0, 65535], got {self.port}")
        problems += self.engine_config().problems()
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


@dataclass(frozen=True)
class ModelPlan:
    """A model directory checked before anything loads: its manifest (read once per server or
    replica, then handed on) and the shared-KV variant to serve."""

    model_dir: Path
    manifest: Manifest
    precision: str


def plan_model(opts: ServeOptions) -> ModelPlan:
    """Read the manifest and pick the variant now (cheap), so a wrong directory or a variant the
    engine cannot batch fails before the server starts."""
    from gpt2_onnx.runtime.device import resolve_device
    from gpt2_onnx.runtime.generator import pick_variant
    from gpt2_onnx.runtime.manifest import read_manifest

    manifest = read_manifest(opts.model_dir)
    variant = pick_variant(manifest, opts.precision, resolve_device(opts.device))
    if not variant.shared_kv:
        present = [p for p, v in manifest.variants.items() if v.shared_kv]
        known = variants.shared_kv_names()
        hint = (f"pass --precision {present[0]}" if present else
                f"re-export with a shared-KV variant beside fp32 (--precision fp32,{known[0]}; "
                f"any of {', '.join(known)})")
        raise Gpt2OnnxError(
            f"{opts.model_dir}: variant {variant.precision!r} (a concat-KV graph) cannot batch "
            f"requests in flight; the server needs a shared-KV variant: {hint}")
    return ModelPlan(Path(opts.model_dir), manifest, variant.precision)


class EngineHost:
    """One engine behind the app: loads the generator, starts the engine, makes `state` (what
    the routes read) ready, closes the engine on shutdown."""

    def __init__(self, opts: ServeOptions, plan: ModelPlan | None = None) -> None:
        self.opts = opts
        self.plan = plan_model(opts) if plan is None else plan
        model_id = opts.model_id or Path(opts.model_dir).resolve().name
        self.state = ServerState(model_id=model_id, api_key=opts.api_key,
                                 log_prompts=opts.log_prompts)
        self.generator: TextGenerator | None = None
        self.engine: Engine | None = None

    def app(self) -> FastAPI:
        """The ASGI app over this host's state (503 until `load` is done)."""
        from gpt2_onnx.serve.app import create_app

        return create_app(self.state, ui=self.opts.ui)

    def load(self) -> Engine:
        """Load the model (the plan's manifest, not read again) and start its engine; the
        state turns ready. Raises what TextGenerator.load and Engine raise."""
        from gpt2_onnx.runtime.engine import Engine
        from gpt2_onnx.runtime.generator import TextGenerator

        plan, opts = self.plan, self.opts
        gen = TextGenerator.load(plan.model_dir, device=opts.device, precision=plan.precision,
                                 threads=opts.threads, manifest=plan.manifest)
        self.generator = gen
        self.engine = Engine.from_config(gen, opts.engine_config()).start()
        return self.engine

    def expose(self) -> None:
        """Hand the started engine to the routes (ServerState phase "ready")."""
        if self.engine is None:
            raise RuntimeError("EngineHost.expose: load() first")
        self.state.set_ready(self.engine)

    def close(self, grace: float | None = 0) -> None:
        """Stop the engine (requests in flight get `grace` seconds; None: all of them)."""
        if self.engine is not None:
            self.engine.close(grace=grace)
