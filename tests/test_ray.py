"""`gpt2-onnx serve --ray` (issue 14): the same routes on Ray Serve replicas.

A local Ray is started by the CLI under test (num_cpus = 2 replicas x 1 thread, no dashboard)
and stopped by its SIGTERM. Against the single-process server on the same tiny export: both
replicas answer (the x-gpt2-onnx-replica header names them), completions streamed and not equal
the single server's for the same seed, and a replica killed (SIGKILL) mid-stream is replaced
while the endpoint keeps answering; the stream it carried ends with an error, not a hang. On a
copy with a changed file no replica starts and the CLI exits 1 naming it.

Slow (Ray's own processes start in ~30 s on 2 busy cores): run with `pytest -m slow
tests/test_ray.py`. The replica's hash check runs without Ray (fast).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gpt2_onnx.runtime.errors import ModelDirError

HEADER = "x-gpt2-onnx-replica"
LAUNCH = "import sys\nfrom gpt2_onnx.cli import main\nsys.argv[0] = 'gpt2-onnx'\nmain()\n"
BODIES = [  # sampled with a seed, and greedy
    {"prompt": "Paris will", "max_tokens": 24, "temperature": 0.9, "seed": 7},
    {"prompt": "The quick brown", "max_tokens": 16, "temperature": 0.7, "top_p": 0.9,
     "seed": 123},
    {"prompt": "Once upon a time", "max_tokens": 20, "temperature": 0},
]


class Cli:
    """`gpt2-onnx serve ...` in a subprocess; the URL is read from its stderr (kept in a file)."""

    def __init__(self, log: Path, *args: str, ready_timeout: float = 60) -> None:
        self.log = log
        self._stderr = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "serve", *args],
                                     stdout=subprocess.DEVNULL, stderr=self._stderr,
                                     env={**os.environ, "COLUMNS": "300", "NO_COLOR": "1"})
        end = time.monotonic() + ready_timeout
        self.url = ""
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited {self.proc.returncode}: {log.read_text()}")
            found = re.search(r"http://127\.0\.0\.1:\d+", log.read_text())
            if found:
                self.url = found.group(0)
                try:
                    if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"not ready in {ready_timeout} s: {log.read_text()}")

    def stop(self, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            self._stderr.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def _stream_text(url: str, body: dict) -> tuple[str, str | None]:
    """The joined text of a streamed completion and the replica that sent it."""
    parts = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                      timeout=60) as res:
        assert res.status_code == 200, res.read()
        for line in res.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                parts.append(json.loads(line[6:])["choices"][0]["text"])
        return "".join(parts), res.headers.get(HEADER)


@pytest.fixture(scope="module")
def single(tiny_fused_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    cli = Cli(tmp_path_factory.mktemp("single") / "server.log", str(tiny_fused_dir),
              "--port", "0", "--threads", "1")
    yield cli
    assert cli.stop() == 0, cli.log.read_text()


@pytest.fixture(scope="module")
def on_ray(tiny_fused_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    pytest.importorskip("ray.serve")
    env_address = os.environ.pop("RAY_ADDRESS", None)  # a local Ray of the test's own
    cli = Cli(tmp_path_factory.mktemp("ray") / "server.log", str(tiny_fused_dir), "--ray",
              "--replicas", "2", "--threads", "1", "--slots", "4", "--max-queue", "16",
              "--port", str(_free_port()), ready_timeout=240)
    yield cli
    code = cli.stop()
    if env_address is not None:
        os.environ["RAY_ADDRESS"] = env_address
    assert code == 0, cli.log.read_text()[-3000:]
    assert "stopped" in cli.log.read_text()


@pytest.mark.slow
def test_replicas_answer_like_the_single_server_and_survive_a_kill(on_ray: Cli,
                                                                   single: Cli) -> None:
    # Both replicas answer (Serve routes /health across them as any request).
    seen: set[str] = set()
    for _ in range(40):
        res = httpx.get(f"{on_ray.url}/health", timeout=30)
        assert res.status_code == 200 and res.headers.get(HEADER)
        seen.add(res.headers[HEADER])
        if len(seen) == 2:
            break
    assert len(seen) == 2, seen

    # The same completions as the single-process server, plain and streamed, on both replicas.
    answered: set[str] = set()
    for body in BODIES * 2:
        want = _post(single.url, body)
        got = _post(on_ray.url, body)
        assert want.status_code == got.status_code == 200, got.text
        assert got.json()["choices"] == want.json()["choices"]
        assert got.json()["usage"] == want.json()["usage"]
        answered.add(got.headers[HEADER])
        text, replica = _stream_text(on_ray.url, body)
        assert text == want.json()["choices"][0]["text"]
        answered.add(replica or "")
    assert answered == seen, (answered, seen)

    # Kill the replica carrying a long stream right after its first token (pids looked up
    # first: the stream must still be running); plain requests sent at the kill each end with
    # a 200 from the survivor or a 5xx, none hangs.
    pids = {r: _replica_pid(on_ray.log, r) for r in seen}
    body = {"prompt": "Paris will", "max_tokens": 250, "temperature": 0.9, "seed": 1}
    plain: list[tuple[int, str | None]] = []
    t0 = time.monotonic()
    with httpx.stream("POST", f"{on_ray.url}/v1/completions", json={**body, "stream": True},
                      timeout=30) as res:
        assert res.status_code == 200
        victim = res.headers[HEADER]
        lines = res.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        os.kill(pids[victim], signal.SIGKILL)
        pool = ThreadPoolExecutor(4)
        futures = [pool.submit(_post, on_ray.url, {**body, "seed": i}) for i in range(4)]
        rest: list[str] = []
        with pytest.raises(httpx.HTTPError):  # the connection is cut (or an error event ends it)
            for line in lines:
                rest.append(line)
                if '"error"' in line:
                    raise httpx.RemoteProtocolError(line)
    assert "data: [DONE]" not in rest, "the stream finished although its replica was killed"
    for f in futures:
        r = f.result(timeout=60)  # httpx's own timeout (60 s) turns a hang into an error
        plain.append((r.status_code, r.headers.get(HEADER)))
    pool.shutdown()
    for status, replica in plain:
        assert status == 200 and replica != victim or 500 <= status < 600, plain
    assert time.monotonic() - t0 < 90
    print('plain requests sent at the kill:', plain)

    # The endpoint keeps answering (the other replica), and Serve starts a replacement.
    deadline = time.monotonic() + 120
    replacement = None
    failed = 0  # 5xx while Serve's router still counts the dead replica (none seen so far)
    while time.monotonic() < deadline and replacement is None:
        res = _post(on_ray.url, BODIES[2])
        assert res.status_code == 200 or 500 <= res.status_code < 600, res.text
        if res.status_code == 200:
            assert res.headers[HEADER] != victim
        else:
            failed += 1
        replacement = next((r for r in _health_replicas(on_ray.url) if r not in seen), None)
        time.sleep(0.5)
    assert replacement is not None, "no replacement replica within 120 s"
    assert failed <= 3, f"{failed} requests failed after the kill"
    assert _post(on_ray.url, BODIES[0]).json()["choices"] == \
        _post(single.url, BODIES[0]).json()["choices"]


def _replica_pid(log: Path, replica: str) -> int:
    """The pid of a replica, from Ray's forwarded replica log lines ("(ServeReplica:... pid=N)
    ... <replica id> ...")."""
    for _ in range(50):
        for line in log.read_text().splitlines():
            found = re.search(r"ServeReplica:[^ ]* pid=(\d+)\).*\b" + re.escape(replica) + r"\b",
                              line)
            if found:
                return int(found.group(1))
        time.sleep(0.2)
    raise AssertionError(f"no log line names replica {replica}: {log.read_text()[-2000:]}")


def _health_replicas(url: str, tries: int = 6) -> set[str]:
    names = set()
    for _ in range(tries):
        res = httpx.get(f"{url}/health", timeout=30)
        if res.status_code == 200:
            names.add(res.headers[HEADER])
    return names


# ------------------------------------------------------------------------------ no Ray needed


def test_replica_refuses_a_directory_whose_hashes_differ(tiny_fused_dir: Path,
                                                         tmp_path: Path) -> None:
    """A replica checks every file's sha256 before loading: a changed copy raises (Serve then
    marks the replica failed), an intact copy loads and answers through the shared app."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from gpt2_onnx.serve.ray_app import Gpt2OnnxReplica

    copy = tmp_path / "copy"
    shutil.copytree(tiny_fused_dir, copy)
    settings = {"model_dir": str(copy), "threads": 1, "slots": 2, "max_queue": 4}
    replica = Gpt2OnnxReplica(settings)
    try:
        with TestClient(replica.__serve_build_asgi_app__()) as client:
            res = client.post("/v1/completions", json={"prompt": "Paris will", "max_tokens": 3,
                                                       "temperature": 0})
            assert res.status_code == 200 and res.headers[HEADER] == f"pid-{os.getpid()}"
            assert res.json()["usage"]["completion_tokens"] == 3
        replica.check_health()
    finally:
        replica.engine.close(grace=0)
    with pytest.raises(RuntimeError):
        replica.check_health()  # a closed engine fails Serve's health check

    tokenizer = copy / "tokenizer.json"
    data = bytearray(tokenizer.read_bytes())
    data[data.index(b": ") + 1] = ord("\t")  # same size, same JSON: only the sha256 tells
    tokenizer.write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match="sha256 mismatch for tokenizer.json"):
        Gpt2OnnxReplica(settings)
    Gpt2OnnxReplica(settings, check_hashes=False).engine.close(grace=0)  # opted out: loads


def test_ray_options_map_to_serve_settings(tiny_fused_dir: Path) -> None:
    """num_cpus = threads, max_ongoing_requests = slots, max_queued_requests = the queue bound,
    autoscaling only when max_replicas exceeds replicas; bad values name the setting."""
    from gpt2_onnx.serve.ray_app import RayOptions
    from gpt2_onnx.serve.server import ServeOptions

    base = ServeOptions(model_dir=tiny_fused_dir, threads=3, slots=6, max_queue=20)
    fixed = RayOptions(serve=base, replicas=2).deployment_options()
    assert fixed["ray_actor_options"] == {"num_cpus": 3}
    assert (fixed["max_ongoing_requests"], fixed["max_queued_requests"]) == (6, 20)
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    auto = RayOptions(serve=base, replicas=1, max_replicas=4).deployment_options()
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"] == {"min_replicas": 1, "initial_replicas": 1,
                                          "max_replicas": 4, "target_ongoing_requests": 4}
    with pytest.raises(ValueError, match="max_replicas must be >= replicas"):
        RayOptions(serve=base, replicas=3, max_replicas=2).validate()
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        RayOptions(serve=base, replicas=0).validate()


def test_deploy_examples_are_valid_serve_configs(tiny_fused_dir: Path) -> None:
    """deploy/serve-config.yaml and the RayService's serveConfigV2 pass Serve's own schema, and
    their args build the application (model_dir pointed at a local export)."""
    yaml = pytest.importorskip("yaml")
    pytest.importorskip("ray.serve")
    from ray.serve.schema import ServeDeploySchema

    from gpt2_onnx.serve.ray_app import app_builder

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    config = yaml.safe_load((deploy / "serve-config.yaml").read_text())
    service = yaml.safe_load((deploy / "rayservice.yaml").read_text())
    assert service["kind"] == "RayService"
    for doc in (config, yaml.safe_load(service["spec"]["serveConfigV2"])):
        app = ServeDeploySchema.parse_obj(doc).applications[0]
        assert app.import_path == "gpt2_onnx.serve.ray_app:app_builder"
        args = {**app.args, "model_dir": str(tiny_fused_dir), "precision": "fp32-fused"}
        dep = app_builder(args)._bound_deployment
        assert dep.ray_actor_options == {"num_cpus": args["threads"]}
        assert dep.max_ongoing_requests == args["slots"]
        assert dep.max_queued_requests == args["max_queue"]
        assert dep._deployment_config.autoscaling_config.max_replicas == args["max_replicas"]
    with pytest.raises(ValueError, match="unknown setting"):
        app_builder({"model_dir": str(tiny_fused_dir), "slot": 4})


@pytest.mark.slow
def test_a_changed_copy_fails_to_deploy_and_says_why(tiny_fused_dir: Path,
                                                    tmp_path: Path) -> None:
    """Every replica checks the hashes: on a copy with one file changed (same size), no replica
    starts, Serve reports the deployment failed, and the CLI exits 1 naming the file."""
    pytest.importorskip("ray.serve")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_fused_dir, copy)
    tokenizer = copy / "tokenizer.json"
    data = bytearray(tokenizer.read_bytes())
    data[data.index(b": ") + 1] = ord("\t")
    tokenizer.write_bytes(bytes(data))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run([sys.executable, "-c", LAUNCH, "serve", str(copy), "--ray",
                          "--replicas", "1", "--threads", "1", "--port", str(_free_port())],
                         capture_output=True, text=True, timeout=300,
                         env={**env, "COLUMNS": "300", "NO_COLOR": "1"})
    assert res.returncode == 1, res.stderr[-3000:]
    assert "failed to deploy" in res.stderr and "sha256 mismatch for tokenizer.json" in \
        res.stderr, res.stderr[-3000:]
