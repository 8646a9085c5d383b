"""The server as a Ray Serve application: N replicas of the engine behind one endpoint.

Each replica loads the model directory itself and serves the SAME FastAPI app as
`gpt2-onnx serve` (`app.create_app(ServerState.for_engine(...))`); Ray Serve's proxy routes
requests to replicas and streams their responses. The Serve settings follow the engine's:

- `ray_actor_options.num_cpus` = the replica's intra-op threads (Ray places replicas by it);
- `max_ongoing_requests` = the engine's slots (a replica never queues work behind its batch);
- `max_queued_requests` = the queue bound (Serve answers 503 beyond it, per proxy);
- autoscaling on ongoing requests (target: a replica's slots) when max_replicas > replicas.

A replica checks the manifest's sha256 of every file before it loads (`check_files`): a copy
that differs from the export fails the replica's constructor, Serve reports the deployment
unhealthy with that message, and the replica never answers. `check_health` fails when the
engine has stopped.

    gpt2-onnx serve MODEL_DIR --ray --replicas 2 --threads 1        # local Ray or RAY_ADDRESS
    serve run deploy/serve-config.yaml                              # Ray's own CLI

Ray is imported only here (the `ray` extra); nothing else in gpt2_onnx imports this module.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gpt2_onnx.serve.host import EngineHost, ModelPlan, ServeOptions, plan_model

# Serve forwards its own logger's records from replicas to the driver (and to the replica's log
# file); the ready line names the replica, its pid and its node, to find its logs.
log = logging.getLogger("ray.serve")
APP_NAME = "gpt2-onnx"
DEPLOYMENT_NAME = "gpt2-onnx"
REPLICA_HEADER = "x-gpt2-onnx-replica"  # names the replica that answered
HEALTH_CHECK_PERIOD_S = 5.0
HEALTH_CHECK_TIMEOUT_S = 30.0
RAY_FIX = "the ray extra is not installed: pip install 'gpt2-onnx[ray]'"


@dataclass(frozen=True)
class RayOptions:
    """Settings of the Ray application: the server's (ServeOptions) plus the replicas'."""

    serve: ServeOptions
    replicas: int = 2  # replicas at start (the minimum when autoscaling)
    max_replicas: int | None = None  # > replicas: autoscale on ongoing requests up to this
    check_hashes: bool = True  # sha256 of every file against the manifest before loading
    address: str | None = None  # a running Ray cluster ("auto", "ray://..."); None: RAY_ADDRESS
    # or a local Ray started here with num_cpus = replicas x threads

    @property
    def threads(self) -> int:
        """A replica's intra-op threads and its num_cpus (1 when the server's is unset)."""
        return self.serve.threads or 1

    def validate(self) -> None:
        """ValueError naming every setting outside its range."""
        self.serve.validate()
        problems = []
        if self.replicas < 1:
            problems.append(f"replicas must be >= 1, got {self.replicas}")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            problems.append(f"max_replicas must be >= replicas ({self.replicas}), got "
                            f"{self.max_replicas}")
        if self.serve.max_queue < 1:
            # Serve's max_queued_requests: -1 means unbounded, 0 is not accepted.
            problems.append(f"max_queue must be >= 1 on Ray, got {self.serve.max_queue}")
        if problems:
            raise ValueError("; ".join(problems))

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of `serve.deployment` for these settings."""
        opts: dict[str, Any] = {
            "name": DEPLOYMENT_NAME,
            "ray_actor_options": {"num_cpus": self.threads},
            "max_ongoing_requests": self.serve.slots,
            "max_queued_requests": self.serve.max_queue,
            "health_check_period_s": HEALTH_CHECK_PERIOD_S,
            "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
            "graceful_shutdown_timeout_s": self.serve.grace,
        }
        if self.max_replicas is not None and self.max_replicas > self.replicas:
            opts["autoscaling_config"] = {
                "min_replicas": self.replicas,
                "initial_replicas": self.replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": max(1, self.serve.slots * 3 // 4),
            }
        else:
            opts["num_replicas"] = self.replicas
        return opts


# ------------------------------------------------------------------------------ the replica


class Gpt2OnnxReplica:
    """One replica: checks the directory, hosts the engine (host.EngineHost, as `gpt2-onnx
    serve` does), serves `create_app`'s routes."""

    def __init__(self, settings: dict[str, Any], check_hashes: bool = True) -> None:
        from gpt2_onnx.runtime.manifest import check_files

        opts = _serve_options(settings)
        self.replica = _replica_id()
        start = time.perf_counter()
        plan = plan_model(opts)  # the manifest, read once for the whole replica
        if check_hashes:
            check_files(opts.model_dir, plan.manifest)  # ModelDirError: the replica fails
        self.host = EngineHost(opts, plan)
        self.engine = self.host.load()
        self.host.expose()
        self.state = self.host.state
        gen = self.host.generator
        assert gen is not None
        log.info("gpt2-onnx replica %s ready in %.1f s (%s, %s, %d slots, pid %d on %s)",
                 self.replica, time.perf_counter() - start, gen.device, gen.precision,
                 opts.slots, os.getpid(), socket.gethostname())

    def __serve_build_asgi_app__(self) -> Any:
        """The app of `gpt2-onnx serve` over this replica's state, plus the replica header."""
        app = self.host.app()
        app.add_middleware(ReplicaHeader, value=self.replica)
        return app

    def check_health(self) -> None:
        """Serve calls this every HEALTH_CHECK_PERIOD_S: raise when the engine cannot serve."""
        if self.state.phase != "ready" or self.engine.closed:
            raise RuntimeError(f"replica {self.replica}: engine {self.state.phase}, "
                               f"closed={self.engine.closed}")

    def __del__(self) -> None:
        host = getattr(self, "host", None)
        if host is not None:
            host.close(grace=0)


class ReplicaHeader:
    """ASGI middleware: every HTTP response names the replica that produced it."""

    def __init__(self, app: Any, value: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), value.encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)


def _replica_id() -> str:
    """Serve's id of this replica (unique within the deployment); the pid outside Serve."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:  # not in a replica (a direct construction, e.g. in a test)
        return f"pid-{os.getpid()}"


def _serve_options(settings: dict[str, Any]) -> ServeOptions:
    values = dict(settings)
    values["model_dir"] = Path(values["model_dir"])
    return ServeOptions(**values)


# ------------------------------------------------------------------------------ the application


def build_app(opts: RayOptions, plan: ModelPlan | None = None) -> Any:
    """The Serve application (`serve.run` it, or return it from an application builder).
    plan: the directory already checked (plan_model), else checked here."""
    from ray import serve

    opts.validate()
    if plan is None:
        plan_model(opts.serve)  # a wrong directory fails here, before any replica starts
    settings = asdict(opts.serve)
    settings["model_dir"] = str(Path(opts.serve.model_dir).resolve())
    settings["threads"] = opts.threads  # onnxruntime's threads = the CPUs Ray reserved
    ingress = serve.ingress()(Gpt2OnnxReplica)
    return serve.deployment(ingress, **opts.deployment_options()).bind(settings,
                                                                       opts.check_hashes)


def app_builder(args: dict[str, Any]) -> Any:
    """Application builder for `serve run` / a Serve config file (`import_path:
    gpt2_onnx.serve.ray_app:app_builder`); `args` are ServeOptions' and RayOptions' fields."""
    values = dict(args)
    ray_keys = {"replicas", "max_replicas", "check_hashes"}
    ray_values = {k: values.pop(k) for k in list(values) if k in ray_keys}
    if "model_dir" not in values:
        raise ValueError("args.model_dir: the model directory is required (the same path on "
                         "every node, or shared storage)")
    unknown = set(values) - set(ServeOptions.__dataclass_fields__)
    if unknown:
        raise ValueError(f"args: unknown setting(s) {', '.join(sorted(unknown))}")
    # The server's own host/port do not apply: Serve's proxy listens (http_options).
    values.pop("host", None)
    values.pop("port", None)
    if values.get("api_key") is None and os.environ.get("GPT2_ONNX_API_KEY"):
        values["api_key"] = os.environ["GPT2_ONNX_API_KEY"]  # kept out of the config file
    return build_app(RayOptions(serve=_serve_options(values), **ray_values))


# ------------------------------------------------------------------------------ `--ray` on the CLI


def run(opts: RayOptions, say: Callable[[str], None]) -> int:
    """`gpt2-onnx serve --ray`: start (or join) Ray, run the app on Serve's proxy at
    host:port, wait for SIGTERM/Ctrl-C, then delete the app (and stop a Ray started here)."""
    import ray
    from ray import serve

    opts.validate()
    plan = plan_model(opts.serve)  # before Ray starts: a wrong directory fails at once
    port = opts.serve.port or _free_port(opts.serve.host)
    address = opts.address or os.environ.get("RAY_ADDRESS")
    own_ray = not address  # a cluster we joined keeps Serve; one started here goes with us
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=opts.replicas * opts.threads, include_dashboard=False,
                 logging_level=logging.WARNING)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT,
                                                                       signal.SIGTERM)}
    try:
        serve.start(http_options={"host": opts.serve.host, "port": port})
        shown = f"[{opts.serve.host}]" if ":" in opts.serve.host else opts.serve.host
        say(f"gpt2-onnx serve --ray: http://{shown}:{port} ({opts.replicas} replica(s) x "
            f"{opts.threads} thread(s), {opts.serve.slots} slots each, max queue "
            f"{opts.serve.max_queue}); starting replicas")
        start = time.perf_counter()
        try:
            serve.run(build_app(opts, plan), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # a replica failed to start: Serve's message names why
            say(f"error: the application failed to deploy: {exc}")
            return 1
        say(f"ready in {time.perf_counter() - start:.1f} s")
        while not stop.wait(0.5):
            pass
        say("stopping: replicas finish in-flight requests "
            f"(up to {opts.serve.grace:g} s)")
        serve.delete(APP_NAME)
        if own_ray:
            serve.shutdown()
        say("gpt2-onnx serve --ray: stopped")
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        ray.shutdown()


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
