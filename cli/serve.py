"""`gpt2-onnx serve`: imports the server only when the command runs.

Without the serve extra the command still shows in --help and answers with a one-line install
hint (this module imports only typer, the runtime's variant registry and the CLI's helpers).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from gpt2_onnx.cli.common import DEVICE_HELP, call, err, fail
from gpt2_onnx.runtime import variants
from gpt2_onnx.runtime.config import DEFAULTS

if TYPE_CHECKING:
    from gpt2_onnx.serve.server import ServeOptions

SERVE_PACKAGES = ("fastapi", "uvicorn", "prometheus_client")
SERVE_FIX = "the serve extra is not installed: pip install 'gpt2-onnx[serve]'"
PRECISION_HELP = (f"Variant to serve, one of the directory's with shared KV slots "
                  f"({', '.join(variants.shared_kv_names())}); default: the device's preferred "
                  "one present.")


def missing_serve_packages() -> list[str]:
    """Packages of the serve extra that cannot be imported (checked without importing them)."""
    from gpt2_onnx.runtime.errors import missing_packages

    return missing_packages(SERVE_PACKAGES)


def register(app: typer.Typer) -> None:
    """Add the `serve` command to the `gpt2-onnx` app."""
    app.command("serve")(serve_cmd)


def serve_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Model directory with a shared-KV variant "
                                                   "(fp32-fused, int8 or int4).")],
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 exposes the server "
                                           "on every interface.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free one; the URL is printed).")]
    = 8000,
    precision: Annotated[str | None, typer.Option(help=PRECISION_HELP)] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    threads: Annotated[int | None, typer.Option(
        help="CPU threads (default: the physical cores).")] = None,
    slots: Annotated[int, typer.Option(help="Requests decoded together.")] = DEFAULTS.slots,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for a slot; beyond, "
                                                "429.")] = DEFAULTS.max_queue,
    api_key: Annotated[str | None, typer.Option(
        envvar="GPT2_ONNX_API_KEY", help="Require 'Authorization: Bearer KEY' (also from "
        "$GPT2_ONNX_API_KEY, which keeps it out of the process list).")] = None,
    grace: Annotated[float, typer.Option(help="Seconds in-flight requests get to finish after "
                                              "SIGTERM or Ctrl-C.")] = 30.0,
    log_prompts: Annotated[bool, typer.Option(help="Log prompt text (off: only counts and "
                                                   "timings).")] = False,
    model_name: Annotated[str | None, typer.Option(
        help="The model id clients send and /v1/models lists [the directory's name].")] = None,
    ui: Annotated[bool, typer.Option("--ui/--no-ui", help="Serve the playground page at GET / "
                                     "(a browser UI over the same API).")] = True,
    ray: Annotated[bool, typer.Option(
        "--ray", help="Run as a Ray Serve application: --replicas engines behind Serve's proxy "
        "(needs the ray extra; RAY_ADDRESS or --ray-address joins a cluster).")] = False,
    replicas: Annotated[int, typer.Option(help="With --ray: replicas (each --threads CPUs, "
                                               "--slots ongoing requests).")] = 2,
    max_replicas: Annotated[int | None, typer.Option(
        help="With --ray: autoscale on ongoing requests from --replicas up to this.")] = None,
    ray_address: Annotated[str | None, typer.Option(
        help="With --ray: a running cluster [RAY_ADDRESS, else a local Ray].")] = None,
) -> None:
    """Serve the model over HTTP with OpenAI's Completions API (needs the serve extra)."""
    missing = missing_serve_packages()
    if missing:
        fail(f"{SERVE_FIX} ({', '.join(missing)} missing)")
    from gpt2_onnx.serve.server import ServeOptions, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("gpt2_onnx.serve").setLevel(logging.INFO)
    opts = ServeOptions(model_dir=model_dir, host=host, port=port, precision=precision,
                        device=device, threads=threads, slots=slots, max_queue=max_queue,
                        api_key=api_key, grace=grace, log_prompts=log_prompts,
                        model_id=model_name, ui=ui)
    if ray:
        _serve_ray(opts, replicas, max_replicas, ray_address)
        return
    try:
        code = call(serve, opts, lambda msg: err.print(msg, markup=False, highlight=False))
    except OSError as exc:  # the port is taken, the address is not ours
        fail(str(exc))
    if code:
        raise typer.Exit(code)


def _serve_ray(opts: ServeOptions, replicas: int, max_replicas: int | None,
               address: str | None) -> None:
    """`serve --ray`: the same app on Ray Serve replicas (gpt2_onnx.serve.ray_app)."""
    from dataclasses import replace

    if importlib.util.find_spec("ray") is None:
        fail("the ray extra is not installed: pip install 'gpt2-onnx[ray]'")
    from gpt2_onnx.serve.ray_app import RayOptions
    from gpt2_onnx.serve.ray_app import run as run_ray

    threads = opts.threads or 1  # a replica's CPUs (its num_cpus)
    ray_opts = RayOptions(serve=replace(opts, threads=threads), replicas=replicas,
                          max_replicas=max_replicas, address=address)
    code = call(run_ray, ray_opts, lambda msg: err.print(msg, markup=False, highlight=False))
    if code:
        raise typer.Exit(code)
